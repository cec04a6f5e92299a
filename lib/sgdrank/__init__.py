"""sgdrank: the helper library of the book *Why mini-batch SGD with weight decay learns
low-rank weight matrices*.

Submodules are imported explicitly by the chapters (``from sgdrank import models, metrics``),
so that importing the package itself stays cheap and each chapter's dependencies are visible.

- :mod:`sgdrank.profiles`  -- run profiles (smoke / book / paper) and their settings tables
- :mod:`sgdrank.runtime`   -- device selection, seeding, data and results folders
- :mod:`sgdrank.data`      -- datasets by name, as tensors
- :mod:`sgdrank.models`    -- MLP-L-H, MLP-BN-L-H, RES-BN-L-H, small ReLU conv nets
- :mod:`sgdrank.metrics`   -- singular values, threshold / stable rank, convergence distance
- :mod:`sgdrank.zoo`       -- GSGP's VGG-16-BN, CIFAR ResNet-18 and small ViT (paper profile)
- :mod:`sgdrank.gradients` -- per-sample and batch gradients and their ranks (Chapter 1)
- :mod:`sgdrank.bounds`    -- GSGP Theorem 3.3, both sides (Chapter 3)
- :mod:`sgdrank.linear`    -- overparameterised linear regression, batched (Chapter 2)
- :mod:`sgdrank.sweep`     -- sweeps: many runs, grouped and cached (Chapters 3, 4, 6), built from
  :mod:`sgdrank.runconfig` (what a run is), :mod:`sgdrank.inputs` (its data as tensors),
  :mod:`sgdrank.engine_batched` and :mod:`sgdrank.engine_loop` (the two engines),
  :mod:`sgdrank.record` (what a recorded epoch is, for both engines), :mod:`sgdrank.cache`
  (keys and files) and :mod:`sgdrank.results` (the tables)
- :mod:`sgdrank.dispatch`  -- a sweep's groups as jobs (Slurm or local processes, via submitit)
- :mod:`sgdrank.report`    -- prose numbers, spreads and verdicts from the run; claim records
- :mod:`sgdrank.progress`  -- progress bars that read well live and in committed outputs
- :mod:`sgdrank.plotting`  -- the book's one plot style
- :mod:`sgdrank.edition`   -- the edition number on every page of the book (a Sphinx extension)

``__version__`` is the one source of the edition number: the package metadata
(``pyproject.toml``, dynamic version), the footer of every page (:mod:`sgdrank.edition`),
``CITATION.cff``, ``CHANGELOG.md`` and the release archive's name agree with it (tested).
"""

__version__ = "0.3.2"
