"""The image architectures of GSGP (sec. 4.1), for CIFAR-10-sized inputs: ``VGG16-BN``,
``RESNET18`` and ``VIT``. They are meant for the ``paper`` profile on a GPU; on a CPU they are
only small enough for single forward/backward passes (the Chapter 1 rank checks).

Conventions shared with :mod:`sgdrank.models`:

- every model has ``model.head``, the final classifier (a ``nn.Linear``), and
  :meth:`rank_layers` returning ``[(name, module)]`` for every ``nn.Conv2d`` / ``nn.Linear``
  weight in forward order **except** the classifier. Each name is also the module's path in
  ``model.named_modules()`` (``dict(model.named_modules())[name] is module``);
- a conv weight ``(c_out, c_in, k, k)`` is rank-tracked as the ``c_out x c_in*k*k`` filter
  matrix (:func:`sgdrank.metrics.as_matrix`); biases, BatchNorm / LayerNorm parameters, the ViT
  class token and position embeddings are not rank-tracked;
- initialisation is PyTorch's default for every Conv2d / Linear (kaiming-uniform with
  ``a = sqrt(5)``), BatchNorm ``gamma = 1, beta = 0``, LayerNorm ``1, 0``; the ViT class token and
  position embeddings are ``N(0, 0.02^2)``. :func:`build` seeds it without touching the global RNG.

Chapter 1's count ``M`` (:func:`sgdrank.gradients.applications`) for a 32x32 input: a 3x3
conv with padding 1 at spatial size ``s x s`` (output) multiplies ``N = s^2`` patches, so the
per-sample gradient of a scalar output w.r.t. its filter matrix has rank <= ``min(N, c_out,
9 c_in)`` as long as samples are not coupled (BatchNorm in eval mode). In the ViT every Linear
of a block multiplies ``T = 65`` token vectors (64 patches + class token) and the patch
embedding multiplies 64 patches (its 256 x 48 matrix caps the rank at 48 anyway).

Reduced models by name (Chapter 6, the book profile): a spec is a model name, optionally
followed by ``:`` and comma-separated ``option=value`` pairs, case-insensitive
(:func:`parse_spec`, :data:`OPTIONS`):

- ``"VGG16-BN:width=8"``: the VGG-16 channel plan scaled by ``width / 64``
  (8, 8 | 16, 16 | 32, 32, 32 | 64, 64, 64 | 64, 64, 64);
- ``"RESNET18:width=8"``: stage widths ``(w, 2w, 4w, 8w)`` = 8, 16, 32, 64;
- ``"VIT:dim=32,depth=2,heads=4,mlp=64,patch=7"``: embedding dimension, blocks, heads, MLP width,
  patch size (``dropout=0.1`` too).

No options: the paper's full model. All three take 28x28 inputs (Fashion-MNIST, ``(1, 28, 28)``):
VGG's pools use ``ceil_mode=True`` (28 -> 14 -> 7 -> 4 -> 2 -> 1; on even sizes such as CIFAR's
32x32 this is the same as floor mode, so the paper's model is unchanged), ResNet's stride-2
convs give 28 -> 14 -> 7 -> 4, and the ViT needs a patch size that divides 28 (7: 16 patches + the
class token = 17 tokens; 4: 49 + 1 = 50).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ZOO = ("VGG16-BN", "RESNET18", "VIT")

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in in_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError("the zoo's models take images: in_shape must be (channels, height, "
                         f"width), got {in_shape!r}")
    return shape  # type: ignore[return-value]


class VGG16BN(nn.Module):
    """``VGG16-BN``: VGG-16's 13 convolutions with BatchNorm, and one linear classifier.

    Architecture (input ``(B, c, h, w)``, CIFAR-10: ``c, h, w = 3, 32, 32``)::

        5 stages, conv channels (64, 64 | 128, 128 | 256, 256, 256 | 512, 512, 512 | 512, 512, 512),
        each conv:  Conv2d(c_in, c_out, 3, stride 1, padding 1, bias=True) -> BatchNorm2d -> ReLU,
        after each stage: MaxPool2d(2, 2, ceil_mode=True)  (32 -> 16 -> 8 -> 4 -> 2 -> 1;
                                                            28 -> 14 -> 7 -> 4 -> 2 -> 1)
        flatten (512 * ceil(h/32) * ceil(w/32) = 512 features at 32x32 and 28x28)
        -> head = Linear(512, out_dim).

    ``width``: the channel plan scaled by ``width / 64`` (``width=8``: 8, 8 | 16, 16 | 32, 32, 32
    | 64, 64, 64 | 64, 64, 64; the head then reads 64 features); None: the paper's 64.

    This is GSGP's "VGG-16 ... with dropout replaced by batch normalization layers, and a single
    fully-connected layer at the end", and the authors' code: BN after every conv (before the
    ReLU), conv bias kept (redundant before BN, as in torchvision's ``vgg16_bn``), no
    fully-connected hidden layers and no dropout anywhere. 14,728,266 parameters for
    ``out_dim = 10`` (the authors' model, whose trailing ``AvgPool2d(1, 1)`` is the identity and is
    left out here).

    Rank-tracked: the 13 conv filter matrices, named ``stage{s}.conv{i}``
    (``stage1.conv1`` is 64 x 27, ``stage5.conv3`` is 512 x 4608); the classifier is excluded,
    as in the authors' code. Output positions (patches) per conv at 32x32: 1024, 256, 64, 16, 4
    for stages 1-5; at 28x28: 784, 196, 49, 16, 4.
    """

    def __init__(self, in_shape: Sequence[int] = (3, 32, 32), out_dim: int = 10,
                 cfg: Sequence[int | str] = VGG16_CFG, width: int | None = None):
        super().__init__()
        c, h, w = _image_shape(in_shape)
        if width is not None:
            if int(width) < 1:
                raise ValueError(f"VGG16-BN: width must be >= 1, got {width}")
            cfg = tuple(v if v == "M" else max(1, int(v) * int(width) // 64) for v in cfg)
        pools = sum(1 for v in cfg if v == "M")
        sizes = [(h, w)]
        for _ in range(pools):  # ceil-mode 2x2 pools: every pooled map must be at least 2x2
            sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
        if min(min(hw) for hw in sizes[:-1]) < 2:
            raise ValueError(f"VGG16-BN halves the input {pools} times: {h}x{w} is too small "
                             f"(needs height and width >= {2 ** (pools - 1) + 1}, e.g. 28x28 or "
                             f"CIFAR's 32x32)")
        self.in_shape = (c, h, w)
        self.cfg = tuple(cfg)
        self._convs: list[tuple[str, nn.Conv2d]] = []
        stage, items, i = 1, [], 0
        for v in cfg:
            if v == "M":
                items.append(("pool", nn.MaxPool2d(2, 2, ceil_mode=True)))
                self.add_module(f"stage{stage}", nn.Sequential(OrderedDict(items)))
                stage, items, i = stage + 1, [], 0
                continue
            i += 1
            conv = nn.Conv2d(c, int(v), 3, stride=1, padding=1, bias=True)
            items += [(f"conv{i}", conv), (f"bn{i}", nn.BatchNorm2d(int(v))),
                      (f"relu{i}", nn.ReLU())]
            self._convs.append((f"stage{stage}.conv{i}", conv))
            c = int(v)
        if items:  # a cfg that does not end with "M"
            self.add_module(f"stage{stage}", nn.Sequential(OrderedDict(items)))
            stage += 1
        self.stages = stage - 1
        self.head = nn.Linear(c * sizes[-1][0] * sizes[-1][1], out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened input of the classifier, ``(B, 512)`` at 32x32."""
        x = x.reshape(x.shape[0], *self.in_shape)  # accepts flattened images too
        for s in range(1, self.stages + 1):
            x = getattr(self, f"stage{s}")(x)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        return list(self._convs)


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``conv1``: 3x3, stride ``stride``, padding 1; ``conv2``: 3x3, stride 1, padding 1; both
    without bias. ``shortcut`` is the identity, or ``shortcut_bn(shortcut(x))`` with a 1x1
    conv (stride ``stride``, no bias) when the stride or channel count changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(c_out)
        else:
            self.shortcut = None
            self.shortcut_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return F.relu(out + skip)


class ResNet18(nn.Module):
    """``RESNET18``: the standard CIFAR ResNet-18 (He et al. 2016, as in the authors' code).

    Architecture (CIFAR-10 shapes)::

        stem:   Conv2d(c, 64, 3, stride 1, padding 1, no bias) -> BatchNorm2d -> ReLU
                (no max-pool)
        stage1: 2 BasicBlocks, 64 channels,  stride 1    32x32
        stage2: 2 BasicBlocks, 128 channels, stride 2    16x16   (block1: 1x1 conv + BN shortcut)
        stage3: 2 BasicBlocks, 256 channels, stride 2     8x8    (idem)
        stage4: 2 BasicBlocks, 512 channels, stride 2     4x4    (idem)
        global average pool -> (B, 512) -> head = Linear(512, out_dim)

    with :class:`BasicBlock` ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the stride
    sits on ``conv1`` of a stage's first block. All convs are bias-free (BN follows each).
    11,173,962 parameters for ``out_dim = 10``. No dropout. (The authors' code pools with
    ``avg_pool2d(out, 4)``, which is the global average pool at 32x32.)

    Rank-tracked (20 matrices): ``stem``, ``stage{s}.block{b}.conv1``, ``stage{s}.block{b}.conv2``
    and the three 1x1 shortcut convs ``stage{2,3,4}.block1.shortcut`` (listed after ``conv2`` of
    their block). The authors' average rank used 17 matrices (stem and block convs, no
    shortcuts): ``rank_layers(shortcuts=False)`` gives that set. Output positions per conv at
    32x32: 1024 (stem, stage1), 256, 64, 16 (stages 2-4, shortcut included); at 28x28: 784, 196,
    49, 16.

    ``width``: stage widths ``(width, 2 width, 4 width, 8 width)`` (``width=8``: 8, 16, 32, 64);
    None: ``widths`` (the paper's 64, 128, 256, 512).
    """

    def __init__(self, in_shape: Sequence[int] = (3, 32, 32), out_dim: int = 10,
                 widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (2, 2, 2, 2),
                 width: int | None = None):
        super().__init__()
        c, h, w = _image_shape(in_shape)
        if width is not None:
            if int(width) < 1:
                raise ValueError(f"RESNET18: width must be >= 1, got {width}")
            widths = tuple(int(width) * 2 ** i for i in range(len(widths)))
        self.in_shape = (c, h, w)
        self.stem = nn.Conv2d(c, widths[0], 3, stride=1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        c = widths[0]
        self.stages = len(widths)
        for s, (width, n) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if s == 1 else 2
            items = []
            for b in range(1, n + 1):
                items.append((f"block{b}", BasicBlock(c, width, stride if b == 1 else 1)))
                c = width
            self.add_module(f"stage{s}", nn.Sequential(OrderedDict(items)))
        self.head = nn.Linear(c, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The globally average-pooled input of the classifier, ``(B, 512)``."""
        x = x.reshape(x.shape[0], *self.in_shape)  # accepts flattened images too
        x = F.relu(self.stem_bn(self.stem(x)))
        for s in range(1, self.stages + 1):
            x = getattr(self, f"stage{s}")(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def rank_layers(self, shortcuts: bool = True) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = [("stem", self.stem)]
        for s in range(1, self.stages + 1):
            for bname, blk in getattr(self, f"stage{s}").named_children():
                p = f"stage{s}.{bname}"
                out += [(f"{p}.conv1", blk.conv1), (f"{p}.conv2", blk.conv2)]
                if shortcuts and blk.shortcut is not None:
                    out.append((f"{p}.shortcut", blk.shortcut))
        return out


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v``, ``out`` Linear layers.

    For tokens ``X`` of shape ``(B, T, d)``: ``Q = q(X)``, ``K = k(X)``, ``V = v(X)``, each
    ``(B, T, d)`` split into ``heads`` heads of size ``d / heads``; per head
    ``softmax(Q_h K_h^T / sqrt(d / heads)) V_h``; heads concatenated -> ``out``. All four are
    ``d x d`` with bias. No attention dropout."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(z):  # (B, T, d) -> (B, heads, T, d / heads)
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class MLPBlock(nn.Module):
    """The transformer MLP: ``drop(fc2(drop(gelu(fc1(x)))))``, ``fc1: d -> mlp_dim``,
    ``fc2: mlp_dim -> d``, dropout probability ``dropout`` (0.1 in GSGP)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """``VIT``: GSGP's small vision transformer (after Dosovitskiy et al. 2020).

    Architecture (CIFAR-10 shapes, defaults)::

        patch_embed: Conv2d(c, d, 4, stride 4)  (32x32 -> 8x8 = 64 patch tokens of dim d = 256)
        prepend a learned class token, add learned position embeddings  -> (B, T = 65, d)
        6 x pre-LN EncoderBlock:  x + attn(ln1(x)),  then  x + mlp(ln2(x))
            attn: 8 heads of size d/8 = 32; separate Linear q, k, v, out (d x d, with bias)
            mlp:  fc1 (d -> mlp_dim = 512), GELU, dropout 0.1, fc2 (mlp_dim -> d), dropout 0.1
        final LayerNorm on the class token -> head = Linear(d, out_dim)

    From GSGP sec. 4.1: 4x4 patches, 8 heads, 6 self-attention layers, "two fully-connected
    layers with a dropout probability of 0.1, and a GELU activation in between". The paper states
    neither the embedding dimension nor the MLP width: ``embed_dim = 256`` and ``mlp_dim = 512``
    are this book's choices (constructor arguments). Dropout is applied only in the MLP (after
    the GELU and after ``fc2``); there is no attention or embedding dropout. 3,195,146
    parameters with the defaults and ``out_dim = 10``.

    Rank-tracked (1 + 6 x 6 = 37 matrices): ``patch_embed`` (``d x c*16``, 256 x 48), then per
    block ``block{i}.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.out``, ``block{i}.mlp.fc1``,
    ``block{i}.mlp.fc2``. Every block Linear multiplies T = 65 token vectors per sample, so its
    per-sample gradient has rank <= 65 (Chapter 1). Two exact refinements: (i) softmax is
    unchanged when a constant is added to one query's scores, so the gradients w.r.t. the keys
    ``k(x_j)`` sum to zero over ``j``: ``rank(dF/dW_k) <= T - 1 = 64`` and the ``k`` bias gets
    zero gradient (the *query* matrix keeps ``T``: each head's block has rank ``<= T - 1``, but
    the heads' blocks sit in different rows and their ranks add up, measured 65 for ``q``);
    (ii) in the last block only the class token reaches the head, so there the
    per-sample gradients of ``q``, ``out``, ``fc1``, ``fc2`` have rank 1 and those of ``k``,
    ``v`` rank <= ``heads`` (one outer product per head).
    """

    def __init__(self, in_shape: Sequence[int] = (3, 32, 32), out_dim: int = 10, *,
                 patch: int = 4, embed_dim: int = 256, depth: int = 6, heads: int = 8,
                 mlp_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        c, h, w = _image_shape(in_shape)
        if h % patch or w % patch:
            raise ValueError(f"ViT: input {h}x{w} is not divisible into {patch}x{patch} patches")
        self.in_shape, self.depth = (c, h, w), depth
        self.tokens = (h // patch) * (w // patch) + 1
        self.patch_embed = nn.Conv2d(c, embed_dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens, embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for i in range(1, depth + 1):
            self.add_module(f"block{i}", EncoderBlock(embed_dim, heads, mlp_dim, dropout))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class token after the last block, ``(B, d)``."""
        x = x.reshape(x.shape[0], *self.in_shape)  # accepts flattened images too
        z = self.patch_embed(x).flatten(2).transpose(1, 2)            # (B, T - 1, d)
        z = torch.cat([self.cls_token.expand(z.shape[0], -1, -1), z], dim=1) + self.pos_embed
        for i in range(1, self.depth + 1):
            z = getattr(self, f"block{i}")(z)
        return self.norm(z[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = [("patch_embed", self.patch_embed)]
        for i in range(1, self.depth + 1):
            b = getattr(self, f"block{i}")
            out += [(f"block{i}.attn.{n}", getattr(b.attn, n)) for n in ("q", "k", "v", "out")]
            out += [(f"block{i}.mlp.fc1", b.mlp.fc1), (f"block{i}.mlp.fc2", b.mlp.fc2)]
        return out


_BUILDERS = {"VGG16-BN": VGG16BN, "RESNET18": ResNet18, "VIT": ViT}

#: the options of a spec string, per model: option name -> (constructor argument, type)
OPTIONS = {
    "VGG16-BN": {"width": ("width", int)},
    "RESNET18": {"width": ("width", int)},
    "VIT": {"dim": ("embed_dim", int), "depth": ("depth", int), "heads": ("heads", int),
            "mlp": ("mlp_dim", int), "patch": ("patch", int), "dropout": ("dropout", float)},
}


def _key(name: str) -> str:
    return "".join(ch for ch in name.split(":", 1)[0].upper() if ch.isalnum())


def _canonical(spec: str) -> str | None:
    """The :data:`ZOO` name of a spec's model part, or None."""
    return {_key(k): k for k in ZOO}.get(_key(spec)) if isinstance(spec, str) else None


def is_zoo(spec) -> bool:
    """True if ``spec`` names a zoo model (with or without options; the options are not
    checked here: :func:`build` and :func:`parse_spec` check them)."""
    return _canonical(spec) is not None


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"VGG16-BN:width=8"`` -> ``("VGG16-BN", {"width": 8})`` (constructor keyword arguments).

    Case-insensitive; spaces are ignored; the model part as in :func:`build`. Raises a
    ValueError naming the valid options for an unknown option, a repeated one, or a value that
    is not a number of the option's type."""
    name = _canonical(spec)
    if name is None:
        raise ValueError(f"unknown zoo model {spec!r}: use one of {', '.join(ZOO)} "
                         f"(the MLP/RES/CONV families are in sgdrank.models.build_model)")
    _, _, rest = spec.partition(":")
    valid = OPTIONS[name]
    kw: dict = {}
    for item in (p.strip() for p in rest.replace(" ", "").split(",")):
        if not item:
            continue
        opt, eq, val = item.partition("=")
        opt = opt.lower()
        if opt not in valid or not eq:
            raise ValueError(f"{name}: unknown option {item!r} in {spec!r}; valid options: "
                             f"{', '.join(f'{o}=<{t.__name__}>' for o, (_, t) in valid.items())}")
        arg, typ = valid[opt]
        if arg in kw:
            raise ValueError(f"{name}: option {opt!r} given twice in {spec!r}")
        try:
            kw[arg] = typ(val)
        except ValueError:
            raise ValueError(f"{name}: option {opt}={val!r} is not a {typ.__name__}") from None
    return name, kw


def build(spec: str, in_shape: Sequence[int] = (3, 32, 32), out_dim: int = 10, *,
          seed: int | None = None, **kw) -> nn.Module:
    """Build a zoo model by name: ``build("RESNET18")``, ``build("vit", embed_dim=384, seed=0)``,
    ``build("VGG16-BN:width=8", (1, 28, 28))``.

    ``spec`` is one of :data:`ZOO` (case-insensitive; hyphens, underscores and spaces are
    ignored, so ``"ResNet-18"`` and ``"vgg16_bn"`` work), optionally with options after a colon
    (:func:`parse_spec`, :data:`OPTIONS`: ``width`` for VGG16-BN and RESNET18; ``dim``,
    ``depth``, ``heads``, ``mlp``, ``patch``, ``dropout`` for VIT). ``in_shape`` is ``(c, h, w)``;
    ``out_dim`` the number of classes; ``kw`` goes to the constructor (:class:`VGG16BN`,
    :class:`ResNet18`, :class:`ViT`). ``seed`` seeds the initialisation without touching the
    global RNG state (as :func:`sgdrank.models.build_model`). The model is returned in training
    mode, float32, on the CPU.
    """
    name, opts = parse_spec(spec)
    both = sorted(set(opts) & set(kw))
    if both:
        raise ValueError(f"{name}: {both} given both in the spec {spec!r} and as arguments")
    cls, kw = _BUILDERS[name], {**opts, **kw}
    fork = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        return cls(in_shape, out_dim, **kw)
