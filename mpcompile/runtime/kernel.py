"""``KernelCall``: the module a lowered graph calls in place of a matmul or convolution, and the
``Runtime`` that decides, per call and device, what computes it.

``KernelCall.forward`` calls the custom op ``torch.ops.mpcompile.kernel`` (``ops.py``: fake
implementation, autograd formula), whose implementation is :meth:`Runtime.run`:

- tensors off the GPU: the reference contract with torch (``reference.py``), state REFERENCE;
- on CUDA without NVRTC: ``mode="auto"`` runs the library op (cuBLAS/cuDNN through torch, in the
  operand dtype) and logs one line; ``mode="on"`` raises :class:`KernelError`;
- on CUDA: on first use of a kernel on a device (the verdict is kept per kernel and device:
  name, arch, index, driver version) the generated kernel must pass ``verify.verify`` (NaN-
  poisoned output between canaries, so an unwritten element or a write outside the output
  fails; exact-integer and sqrt(K)-bounded random checks; the checks ``scripts/gpu_check.py``
  runs). With ``autotune`` every preset tile that builds is verified and the fastest passing one
  is kept; ``"auto"`` also times the library op and keeps it when it is faster. No candidate
  passing, or a kernel that fails to compile or launch: the library op, with the reason logged
  once and shown in ``KernelCall.backend``. Never the FP32 reference on a GPU, never an
  unverified kernel.
  The candidates (:func:`candidates`, each a :class:`Variant`) are the sm_80+ mma.sync kernel
  with each preset tile and, on an sm_90 device, the Hopper wgmma/TMA kernel
  (``codegen/hopper.py``) with each of its presets when ``hopper.supports`` the spec: under
  ``"auto"`` only once a GPU run has proven it there (``hopper.PROVEN_ON``: a wrong mbarrier
  protocol would hang rather than fail verification), under ``"on"`` always.

Operands are realigned before a launch (:func:`realign`): a tensor whose strides differ from
the spec's or whose address is not 16-byte aligned is copied to fresh storage, GEMM operands and
convolution (NHWC/KRSC) operands alike; :func:`check_launchable` asserts it right before the
launch (:class:`LaunchError`).

Decision state lives in a :class:`Runtime`. The op's implementation is a process-wide function
that torch's dispatcher calls with tensors and strings only (eagerly or from Inductor's
generated code), so it finds its runtime through :func:`runtime`: the one :func:`using` made
current, else a default created on first use (nothing is created at import).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..codegen import hopper
from ..codegen.hopper import HopperConfig
from ..codegen.render import render_source
from ..codegen.spec import KernelSpec, Kind, SpecError
from ..codegen.tiles import TILES
from ..dtypes import from_name
from ..errors import KernelError
from . import nvrtc, reference, verify
from .launch import LaunchError, Loaded, device_arch
from .ops import Call, ConvArgs, channel_dim, encode, product_low

log = logging.getLogger("mpcompile.kernels")
ALIGN = 16  # bytes: the widest cp.async copy
NO_NVRTC = "NVRTC not installed (pip install mpcompile[gpu])"


class KernelState(enum.Enum):
    """What ran a :class:`KernelCall` last (its ``detail`` says why or how well)."""

    NOT_RUN = "not run yet"
    REFERENCE = "reference"  # the torch contract: off-GPU
    KERNEL = "generated kernel"
    LIBRARY = "library"  # cuBLAS/cuDNN through torch: faster, unverified kernel, or no NVRTC


@dataclass(frozen=True)
class Record:
    state: KernelState
    detail: str
    timings: dict = field(default_factory=dict, compare=False)  # candidate -> milliseconds


@dataclass(frozen=True)
class Variant:
    """One implementation of a call's kernel: the mma.sync kernel of ``spec`` (sm_80+), or with
    ``hopper`` set, the Hopper wgmma/TMA kernel of ``spec`` in that configuration (sm_90a)."""

    spec: KernelSpec
    hopper: HopperConfig | None = None

    def __post_init__(self) -> None:
        if self.hopper is not None:
            hopper.check(self.spec, self.hopper)

    @property
    def label(self) -> str:
        if self.hopper is None:
            return f"mma.sync {tile_name(self.spec)}"
        c = self.hopper
        return f"wgmma {c.bm}x{c.bn}x{c.bk}"


@dataclass(frozen=True)
class Decision:
    """What runs one call on one device: a verified kernel ``variant`` (KERNEL) or the
    library."""

    state: KernelState
    detail: str
    variant: Variant | None = None
    timings: dict = field(default_factory=dict, compare=False)

    @property
    def spec(self) -> KernelSpec | None:
        return None if self.variant is None else self.variant.spec


# --- operands ---------------------------------------------------------------------------------


def _strides_match(t: torch.Tensor, strides) -> bool:
    return all(n <= 1 or s == w for n, s, w in zip(t.shape, t.stride(), strides))


def realign(t: torch.Tensor, strides, align: int = ALIGN) -> torch.Tensor:
    """``t`` itself if it has ``strides`` (size-1 dimensions aside) and a ``align``-byte aligned
    address, else a copy in fresh storage with ``strides``. (``t.contiguous()`` is no fix: it
    returns a contiguous but misaligned view unchanged.) A zero stride (an expanded operand) is
    kept: one slice is copied and expanded again."""
    strides = tuple(strides)
    if _strides_match(t, strides) and t.data_ptr() % align == 0:
        return t
    zero = [d for d, (n, s) in enumerate(zip(t.shape, strides)) if s == 0 and n > 1]
    src = t
    for d in zero:
        src = src.narrow(d, 0, 1)
    fresh = torch.empty_strided(src.shape, strides, dtype=t.dtype, device=t.device)
    fresh.copy_(src)
    return fresh.expand(t.shape) if zero else fresh


def check_launchable(name: str, t: torch.Tensor, strides, spec: KernelSpec) -> None:
    """Raise :class:`LaunchError` unless ``t`` has ``strides`` and an aligned address."""
    if not _strides_match(t, strides) or t.data_ptr() % ALIGN:
        raise LaunchError(f"kernel {spec.name}: operand {name} has strides {tuple(t.stride())} "
                          f"at address {t.data_ptr():#x}; the kernel needs {tuple(strides)} and "
                          f"{ALIGN}-byte alignment (realign() it first)")


def channels_last_strides(shape) -> tuple[int, ...]:
    """Strides of an NCHW-shaped tensor stored NHWC (KCRS stored KRSC)."""
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def contiguous_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(tuple(shape)):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


# --- what computes a call ---------------------------------------------------------------------


def reference_result(call: Call, x, y, bias, scale) -> torch.Tensor:
    sp, ep, cv = call.spec, call.spec.epilogue, call.conv
    if sp.kind is Kind.GEMM:
        out = reference.gemm(x, y, ep, sp.dtype, bias, scale)
    elif sp.kind is Kind.CONV_FPROP:
        out = reference.conv_fprop(x, y, ep, sp.dtype, cv.stride, cv.padding, cv.dilation,
                                   bias, scale)
    elif sp.kind is Kind.CONV_DGRAD:
        out = reference.conv_dgrad(x, y, cv.input_shape, ep, sp.dtype, cv.stride, cv.padding,
                                   cv.dilation, scale)
    else:
        out = reference.conv_wgrad(x, y, cv.weight_shape, ep, sp.dtype, cv.stride, cv.padding,
                                   cv.dilation, scale)
    return out.to(from_name(call.final)).contiguous()


def library_result(call: Call, x, y, bias, scale) -> torch.Tensor:
    """The same op through torch's libraries (cuBLAS/cuDNN) in the operand dtype, then the
    epilogue in FP32 (one extra rounding, before the epilogue)."""
    acc = product_low(call, x, y).to(torch.float32)
    out = reference.apply_epilogue(acc, call.spec.epilogue, call.spec.dtype, bias, scale,
                                   channel_dim=channel_dim(call.spec.kind))
    return out.to(from_name(call.final)).contiguous()


def launch_result(launcher, call: Call, spec: KernelSpec, x, y, bias, scale,
                  alloc: verify.Alloc | None = None) -> torch.Tensor:
    """Run ``launcher`` (``launch.Loaded`` or a stand-in with its call) for ``spec`` on the
    call's operands: realigned operands, output allocated by ``alloc`` (when verifying a
    ``verify.Guarded``: NaN-poisoned, between canaries), split-K partials summed in FP32, the
    result in the call's final dtype, NCHW."""
    alloc = alloc or (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    dev = x.device
    out_dtype = from_name(spec.epilogue.out)
    splits = (spec.split_k,) if spec.split_k > 1 else ()  # FP32 partials, summed below
    if bias is not None:
        bias = realign(bias, contiguous_strides(bias.shape))
    if scale is not None:
        scale = scale.to(torch.float32)
        scale = realign(scale, contiguous_strides(scale.shape))
    if spec.kind is Kind.GEMM:
        batched = x.dim() == 3
        (_, sa), (_, sb) = (verify.gemm_operand_layout(spec, w, batched) for w in ("a", "b"))
        a, b = realign(x, sa), realign(y, sb)
        check_launchable("a", a, sa, spec)
        check_launchable("b", b, sb, spec)
        c = alloc(splits + (*x.shape[:-1], spec.n), out_dtype, dev)
        launcher(a, b, c, bias, scale)
        out = c.sum(0) if splits else c
    else:
        sx, sy = channels_last_strides(x.shape), channels_last_strides(y.shape)
        a, b = realign(x, sx), realign(y, sy)
        check_launchable("a", a, sx, spec)
        check_launchable("b", b, sy, spec)
        cv = spec.conv
        shape = {Kind.CONV_FPROP: (cv.n, cv.p, cv.q, cv.k),
                 Kind.CONV_DGRAD: (cv.n, cv.h, cv.w, cv.c),
                 Kind.CONV_WGRAD: (cv.k, cv.r, cv.s, cv.c)}[spec.kind]
        c = alloc(splits + shape, out_dtype, dev)
        nhwc = (0, 2, 3, 1)
        launcher(a.permute(nhwc), b.permute(nhwc), c,
                 bias if spec.kind is Kind.CONV_FPROP else None, scale)
        out = (c.sum(0) if splits else c).permute(0, 3, 1, 2)
    return out.to(from_name(call.final)).contiguous()


def candidates(spec: KernelSpec, arch: str | None = None,
               unproven: bool = False) -> list[Variant]:
    """``spec``'s mma.sync kernel, the same with every other preset tile that can build the
    problem, and on ``arch`` sm_90 the Hopper kernel with each preset it supports: if
    ``hopper.PROVEN_ON`` lists the arch, or ``unproven`` (``Policy(kernels="on")``)."""
    out = [Variant(spec)]
    for tile in TILES.values():
        try:
            cand = Variant(dataclasses.replace(spec, tile=tile))
        except SpecError:
            continue
        if cand not in out:
            out.append(cand)
    proven = arch in hopper.PROVEN_ON or unproven
    if arch in ("sm_90", "sm_90a") and proven and hopper.supports(spec) is None:
        out += [Variant(spec, config) for config in hopper.PRESETS]
    return out


def tile_name(spec: KernelSpec) -> str:
    t = spec.tile
    return f"{t.bm}x{t.bn}x{t.bk}"


def cuda_timer(fn: Callable[[], object]) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream (2 warm-up calls, 5 timed)."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 5


def _driver_version() -> str:
    try:
        from cuda.bindings import driver as cu

        err, version = cu.cuDriverGetVersion()
        return str(version) if err == cu.CUresult.CUDA_SUCCESS else "unknown"
    except Exception:  # noqa: BLE001 - only labels the cache key
        return "unknown"


def device_key(device: torch.device) -> str:
    """What a verification verdict is valid for: the device's name, arch, index and driver."""
    if device.type != "cuda":
        return str(device)
    return _cuda_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_key(index: int) -> str:  # memoised: read on every call of a kernel op
    return (f"{torch.cuda.get_device_name(index)} {device_arch(torch.device('cuda', index))} "
            f"cuda:{index} driver {_driver_version()}")


def nvrtc_loader(spec: KernelSpec, device: torch.device):
    compiled = nvrtc.compile_cubin(render_source(spec), spec.name, device_arch(device))
    return Loaded(spec, compiled, device)


def hopper_loader(spec: KernelSpec, config: HopperConfig, device: torch.device):
    from .tma import HopperLoaded  # the driver's tensor maps: only where a GPU is

    return HopperLoaded(spec, config, hopper.compile_hopper(spec, config), device)


def arch_of(device: torch.device) -> str | None:
    """The device's ``sm_XY``, or None off CUDA."""
    return device_arch(device) if device.type == "cuda" else None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


class Runtime:
    """Decision state of the generated kernels: per (call, device) what runs (:class:`Decision`),
    per (kernel, device) the verification verdict, per call what ran last (:class:`Record`).

    ``loader(spec, device)`` gives a launcher (default: NVRTC + ``launch.Loaded``), and
    ``hopper(spec, config, device)`` one of the Hopper kernel (default: NVRTC for sm_90a +
    ``tma.HopperLoaded``); ``arch(device)`` the device's architecture, which decides whether
    the Hopper candidates are tried (default: the CUDA capability, None elsewhere);
    ``nvrtc_available`` whether NVRTC can compile (default: ``nvrtc.available()``);
    ``devices`` the device types the generated kernels run on; ``timer(fn)`` milliseconds per
    call (default: CUDA events). Tests pass a NumPy-model loader and CPU to drive every path."""

    def __init__(self, loader=nvrtc_loader, nvrtc_available: bool | None = None,
                 devices: tuple[str, ...] = ("cuda",), timer=cuda_timer,
                 hopper=hopper_loader, arch=arch_of):
        self.loader = loader
        self.hopper = hopper
        self.arch = arch
        self.nvrtc_available = nvrtc.available() if nvrtc_available is None else nvrtc_available
        self.devices = devices
        self.timer = timer
        self.decisions: dict[tuple, Decision] = {}
        self.verdicts: dict[tuple, verify.Verdict] = {}
        self.last: dict[tuple, Record] = {}
        self._loaded: dict[tuple, object] = {}
        self._logged: set[str] = set()
        self._lock = threading.RLock()

    def _log_once(self, level: int, msg: str) -> None:
        if msg not in self._logged:
            self._logged.add(msg)
            log.log(level, msg)

    def launcher(self, variant: Variant, device: torch.device):
        key = (variant, str(device))
        if key not in self._loaded:
            self._loaded[key] = (self.loader(variant.spec, device) if variant.hopper is None
                                 else self.hopper(variant.spec, variant.hopper, device))
        return self._loaded[key]

    def launch(self, call: Call, variant: Variant, x, y, bias, scale, alloc=None):
        return launch_result(self.launcher(variant, x.device), call, variant.spec, x, y, bias,
                             scale, alloc)

    # -- per call -------------------------------------------------------------------------------

    def run(self, call: Call, mode: str, autotune: bool, x, y, bias, scale) -> torch.Tensor:
        if (bias is not None) != call.has_bias or (scale is not None) != call.has_scale:
            raise KernelError(f"kernel {call.spec.name}: called with bias={bias is not None}, "
                              f"scale={scale is not None}; it was built for "
                              f"bias={call.has_bias}, scale={call.has_scale}")
        key = (call, mode, autotune)
        if x.device.type not in self.devices:
            self.last[key] = Record(KernelState.REFERENCE, f"tensors on {x.device.type}, no GPU")
            return reference_result(call, x, y, bias, scale)
        if not self.nvrtc_available:
            if mode == "on":
                raise KernelError(f"Policy(kernels='on') on {x.device.type}: {NO_NVRTC}; install "
                                  "it, or use kernels='auto' (the library op) or 'off'")
            self._log_once(logging.WARNING, f"generated kernels: {NO_NVRTC}; kernels='auto' "
                                            "runs the library ops in low precision")
            self.last[key] = Record(KernelState.LIBRARY, NO_NVRTC)
            return library_result(call, x, y, bias, scale)
        dkey = (key, device_key(x.device))
        with self._lock:
            dec = self.decisions.get(dkey)
            if dec is None:
                dec = self.decisions[dkey] = self.decide(call, mode, autotune, dkey[1],
                                                         x, y, bias, scale)
        if dec.state is KernelState.KERNEL:
            try:
                out = self.launch(call, dec.variant, x, y, bias, scale)
            except Exception as e:  # noqa: BLE001 - fall back loudly, never silently wrong
                why = f"launch failed: {_first_line(e)}"
                self._log_once(logging.WARNING, f"kernel {dec.spec.name} ({dec.variant.label}): "
                                                f"{why}; using the library op")
                dec = self.decisions[dkey] = Decision(KernelState.LIBRARY, why)
            else:
                self.last[key] = Record(dec.state, dec.detail, dec.timings)
                return out
        self.last[key] = Record(dec.state, dec.detail, dec.timings)
        return library_result(call, x, y, bias, scale)

    def verdict(self, call: Call, variant: Variant, dkey: str, device) -> verify.Verdict:
        """The verification verdict of ``variant`` on the device (computed once per device
        key)."""
        spec = variant.spec
        problem = dataclasses.replace(call.problem, spec=spec)
        key = (problem, variant.hopper, dkey)
        if key not in self.verdicts:
            def launch(a, b, bias, scale, alloc):
                return self.launch(call, variant, a, b, bias, scale, alloc)

            try:
                v = verify.verify(problem, launch, device)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run fails its check
                v = verify.Verdict(False, f"could not run: {_first_line(e)}")
            if not v.ok:
                self._log_once(logging.WARNING, f"kernel {spec.name} ({variant.label}) "
                                                f"failed verification on {dkey}: {v.detail}")
            self.verdicts[key] = v
        return self.verdicts[key]

    def decide(self, call: Call, mode: str, autotune: bool, dkey: str, x, y, bias,
               scale) -> Decision:
        """Verify the candidates, time the passing ones (and, under "auto", the library)."""
        arch = self.arch(x.device)
        cands = (candidates(call.spec, arch, unproven=mode == "on") if autotune
                 else [Variant(call.spec)])
        verdicts = [(c, self.verdict(call, c, dkey, x.device)) for c in cands]
        passing = [(c, v) for c, v in verdicts if v.ok]
        if not passing:
            _, v = verdicts[0]
            return Decision(KernelState.LIBRARY, f"the generated kernel failed verification: "
                                                 f"{v.detail}")
        if not autotune:
            return Decision(KernelState.KERNEL, passing[0][1].detail, passing[0][0])
        timings: dict[str, float] = {}
        best: tuple[float, Variant | None, str] = (float("inf"), None, "")
        for cand, v in passing:
            try:
                t = self.timer(lambda cand=cand: self.launch(call, cand, x, y, bias, scale))
            except Exception as e:  # noqa: BLE001 - a candidate that fails is skipped
                log.info("%s of %s failed while timing: %s", cand.label, call.spec.name, e)
                continue
            timings[_timing_key(cand)] = t
            if t < best[0]:
                best = (t, cand, v.detail)
        t_lib = self.timer(lambda: library_result(call, x, y, bias, scale))
        timings["library"] = t_lib
        if best[1] is None:
            return Decision(KernelState.LIBRARY, "every verified candidate failed when timed",
                            timings=timings)
        if mode == "auto" and t_lib < best[0]:
            return Decision(KernelState.LIBRARY,
                            f"cuBLAS/cuDNN via torch: {t_lib:.3f} ms < verified kernel "
                            f"{best[0]:.3f} ms", timings=timings)
        what = (f"tile {tile_name(best[1].spec)}" if best[1].hopper is None
                else best[1].label)
        return Decision(KernelState.KERNEL,
                        f"{what} autotuned: {best[0]:.3f} ms, library "
                        f"{t_lib:.3f} ms; {best[2]}", best[1], timings)


def _timing_key(v: Variant) -> str:
    return f"kernel {tile_name(v.spec)}" if v.hopper is None else f"kernel {v.label}"


_DEFAULT: list[Runtime] = []  # the process's runtime, created on first use
_CURRENT: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "mpcompile_kernel_runtime", default=None)
_DEFAULT_LOCK = threading.Lock()


def runtime() -> Runtime:
    """The runtime the kernel op uses here: the one :func:`using` made current, else the
    process's default (created on first use)."""
    current = _CURRENT.get()
    if current is not None:
        return current
    with _DEFAULT_LOCK:
        if not _DEFAULT:
            _DEFAULT.append(Runtime())
        return _DEFAULT[0]


@contextlib.contextmanager
def using(rt: Runtime) -> Iterator[Runtime]:
    """Run kernel ops under ``rt`` (its own decisions and verdicts) inside the block."""
    token = _CURRENT.set(rt)
    try:
        yield rt
    finally:
        _CURRENT.reset(token)


# --- the module -------------------------------------------------------------------------------


class KernelCall(torch.nn.Module):
    """Arguments by ``role`` (the spec's kind): GEMM a, b[, bias][, scale]; CONV_FPROP x, w[,
    bias][, scale]; CONV_DGRAD grad_out, w[, scale]; CONV_WGRAD grad_out, x[, scale].
    ``mode``: ``Policy.kernels`` ("auto" or "on"). ``state``, ``detail``, ``timings`` and
    ``backend`` read what the current :func:`runtime` recorded for this call."""

    def __init__(self, spec: KernelSpec, has_bias: bool, has_scale: bool,
                 conv: ConvArgs | None = None, final: str | None = None, mode: str = "auto"):
        super().__init__()
        if mode not in ("auto", "on"):
            raise KernelError(f"KernelCall(mode={mode!r}): use 'auto' or 'on'")
        self.has_bias, self.has_scale, self.conv, self.mode = has_bias, has_scale, conv, mode
        # the dtype the graph expects: split-K results are summed in FP32, then rounded once
        self.final = final or spec.epilogue.out
        self.autotune = True  # on the first CUDA use: verify and time the tile presets
        self.spec = spec

    @property
    def spec(self) -> KernelSpec:
        return self._call.spec

    @spec.setter
    def spec(self, spec: KernelSpec) -> None:
        self._call = Call(spec, self.has_bias, self.has_scale, self.conv, self.final)
        self.call = encode(self._call)

    @property
    def role(self) -> Kind:
        return self.spec.kind

    def _record(self) -> Record | None:
        return runtime().last.get((self._call, self.mode, self.autotune))

    @property
    def state(self) -> KernelState:
        r = self._record()
        return r.state if r else KernelState.NOT_RUN

    @property
    def detail(self) -> str:
        r = self._record()
        return r.detail if r else ""

    @property
    def timings(self) -> dict[str, float]:
        r = self._record()
        return dict(r.timings) if r else {}

    @property
    def backend(self) -> str:
        """What ran this call last, in words (reports print it)."""
        return f"{self.state.value} ({self.detail})" if self.detail else self.state.value

    def extra_repr(self) -> str:
        return f"{self.spec.name}, role={self.role.value}, mode={self.mode}"

    def forward(self, *args):
        x, y, rest = args[0], args[1], list(args[2:])
        bias = rest.pop(0) if self.has_bias else None
        scale = rest.pop(0) if self.has_scale else None
        # the OpOverload: ~170 us less per call than calling the CustomOpDef (measured, CPU)
        return torch.ops.mpcompile.kernel.default(x, y, bias, scale, self.call, self.mode,
                                                  self.autotune)


__all__ = ["ALIGN", "NO_NVRTC", "ConvArgs", "Decision", "KernelCall", "KernelState", "Record",
           "Runtime", "Variant", "arch_of", "candidates", "channels_last_strides",
           "check_launchable", "contiguous_strides", "device_key", "hopper_loader",
           "launch_result", "library_result", "nvrtc_loader", "realign", "reference_result",
           "runtime", "using"]
