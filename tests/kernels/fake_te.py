"""A stand-in for `transformer_engine` on machines without it (no CUDA here).

It implements, in plain torch, the documented semantics our wiring relies on: parameter names and
local shapes, `parallel_mode` column/row with `tp_group`/`tp_size`, `sequence_parallel` gathering and
reduce-scattering along dim 0 of [seq, batch, hidden], LayerNormMLP's fc1 = [gate; up] with SwiGLU,
the recipe classes and both autocast spellings. Every constructor call is recorded, so tests can
check what our code passed. The FP8 numerics themselves are only testable on a GPU with real TE.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel import mappings

CALLS: list[tuple[str, dict]] = []
AUTOCASTS: list[tuple[str, dict]] = []


def _rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class _Base(nn.Module):
    def _setup(self, name, kw):
        CALLS.append((name, kw))
        self.tp_group, self.tp = kw.get("tp_group"), kw.get("tp_size", 1)
        self.sp = kw.get("sequence_parallel", False)
        self.dtype = kw.get("params_dtype") or torch.float32
        self.device = kw.get("device", "cuda")

    def _p(self, *shape, fill=None):
        p = nn.Parameter(torch.empty(*shape, dtype=self.dtype, device=self.device))
        with torch.no_grad():
            p.fill_(fill) if fill is not None else p.normal_(0, 0.02)
        return p

    def _column_in(self, x):
        return mappings.gather_from_sequence(x, self.tp_group) if self.sp else mappings.copy_to_tp(x, self.tp_group)

    def _row_out(self, y):
        if self.sp:
            return mappings.reduce_scatter_to_sequence(y, self.tp_group)
        return mappings.reduce_from_tp(y, self.tp_group)


class Linear(_Base):
    def __init__(self, in_features, out_features, bias=True, parallel_mode=None, **kw):
        super().__init__()
        self._setup("Linear", dict(kw, in_features=in_features, out_features=out_features, bias=bias,
                                   parallel_mode=parallel_mode))
        self.mode = parallel_mode
        out_l = out_features // self.tp if parallel_mode == "column" else out_features
        in_l = in_features // self.tp if parallel_mode == "row" else in_features
        self.weight = self._p(out_l, in_l)

    def forward(self, x):
        if self.mode == "column":
            return F.linear(self._column_in(x), self.weight)
        y = F.linear(x, self.weight)
        return self._row_out(y) if self.mode == "row" else y


class LayerNormLinear(_Base):
    def __init__(self, in_features, out_features, eps=1e-5, bias=True, normalization="LayerNorm",
                 parallel_mode=None, **kw):
        super().__init__()
        self._setup("LayerNormLinear", dict(kw, in_features=in_features, out_features=out_features, eps=eps,
                                            bias=bias, normalization=normalization, parallel_mode=parallel_mode))
        assert normalization == "RMSNorm" and parallel_mode == "column"
        self.eps = eps
        self.layer_norm_weight = self._p(in_features, fill=1.0)
        self.weight = self._p(out_features // self.tp, in_features)

    def forward(self, x):
        return F.linear(self._column_in(_rms(x, self.layer_norm_weight, self.eps)), self.weight)


class LayerNormMLP(_Base):
    def __init__(self, hidden_size, ffn_hidden_size, eps=1e-5, bias=True, normalization="LayerNorm",
                 activation="gelu", **kw):
        super().__init__()
        self._setup("LayerNormMLP", dict(kw, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, eps=eps,
                                         bias=bias, normalization=normalization, activation=activation))
        assert normalization == "RMSNorm" and activation == "swiglu"
        self.eps = eps
        f = ffn_hidden_size // self.tp
        self.layer_norm_weight = self._p(hidden_size, fill=1.0)
        self.fc1_weight = self._p(2 * f, hidden_size)
        self.fc2_weight = self._p(hidden_size, f)

    def forward(self, x):
        h = F.linear(self._column_in(_rms(x, self.layer_norm_weight, self.eps)), self.fc1_weight)
        gate, up = h.chunk(2, dim=-1)
        return self._row_out(F.linear(F.silu(gate) * up, self.fc2_weight))


class RMSNorm(_Base):
    def __init__(self, hidden_size, eps=1e-5, **kw):
        super().__init__()
        self._setup("RMSNorm", dict(kw, hidden_size=hidden_size, eps=eps))
        self.eps = eps
        self.weight = self._p(hidden_size, fill=1.0)

    def forward(self, x):
        return _rms(x, self.weight, self.eps)


class Format(enum.Enum):
    E4M3 = "E4M3"
    HYBRID = "HYBRID"


class _Recipe:
    def __init__(self, **kw):
        self.kw = kw


class DelayedScaling(_Recipe):
    pass


class Float8CurrentScaling(_Recipe):
    pass


class MXFP8BlockScaling(_Recipe):
    pass


def install(monkeypatch, new_api: bool = True, fp8_ok: tuple[bool, str] = (True, "")) -> types.ModuleType:
    """Puts the fake into sys.modules (undone by `monkeypatch`); returns transformer_engine.pytorch."""
    CALLS.clear()
    AUTOCASTS.clear()
    root = types.ModuleType("transformer_engine")
    pt = types.ModuleType("transformer_engine.pytorch")
    fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    for cls in (Linear, LayerNormLinear, LayerNormMLP, RMSNorm):
        setattr(pt, cls.__name__, cls)
    for cls in (Format, DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling):
        setattr(recipe, cls.__name__, cls)
    fp8.check_fp8_support = lambda: fp8_ok
    fp8.check_mxfp8_support = lambda: fp8_ok
    pt.fp8 = fp8

    def _ctx(name):
        @contextlib.contextmanager
        def ctx(**kw):
            AUTOCASTS.append((name, kw))
            yield
        return ctx

    if new_api:
        pt.autocast = _ctx("autocast")
    pt.fp8_autocast = _ctx("fp8_autocast")
    root.pytorch, root.common, common.recipe = pt, common, recipe
    for name, mod in {"transformer_engine": root, "transformer_engine.pytorch": pt,
                      "transformer_engine.pytorch.fp8": fp8, "transformer_engine.common": common,
                      "transformer_engine.common.recipe": recipe}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return pt


def install_plain() -> None:
    """The same, for spawned worker processes (no monkeypatch there; the process ends anyway)."""

    class _MP:
        def setitem(self, d, k, v):
            d[k] = v

    install(_MP())
