"""The CUDA-only logic, checked on the CPU: stream order of the host-cache prefetch, what is alive when
the out-of-memory ladder steps down, pinned memory as allocated and refused, device-independent EDM
constants, float32 sigmas beside a bf16 state, and the patch embedding as one matmul."""

import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import infdit_cli.engine.blocks as engine_mod
import infdit_cli.engine.storage as storage_mod
from infdit_cli.engine.blocks import BlockEngine, denoise
from infdit_cli.engine.sampling import edm_sigmas, sample_heun
from infdit_cli.engine.storage import Scratch
from infdit_cli.model.config import PRESETS
from infdit_cli.model.layers import edm_scalings
from infdit_cli.plan.planner import Placement, host_available


def _inputs(cfg, h=48, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(1, 3, h // cfg.sr_scale, w // cfg.sr_scale, generator=g) * 2 - 1
    lr_up = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    x = lr_up + torch.randn(1, 3, h, w, generator=g)
    return x, lr_up, lr, torch.randn(1, cfg.vector_dim, generator=g)


class _FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.device = name, log, torch.device("cuda", 0)

    def wait_stream(self, other) -> None:
        self.log.append(f"{self.name} waits {other.name}")


def test_prefetch_fetches_on_the_side_stream_after_the_compute_stream(monkeypatch):
    """Layer i+1's neighbours are fetched on the side stream, which first waits for the compute stream
    (host entries may still be being written); the compute stream waits for the side stream before it
    uses them, and records them as used on it (they were allocated on the side stream)."""
    log: list[str] = []
    side, compute = _FakeStream("side", log), _FakeStream("compute", log)

    @contextlib.contextmanager
    def on(stream):
        log.append(f"enter {stream.name}")
        yield
        log.append(f"exit {stream.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(f"record on {s.name}"))

    def fetch(layer):
        log.append(f"fetch {layer}")
        return torch.zeros(1), torch.zeros(1), None, None  # left k/v, no top row

    pf = engine_mod._Prefetch(fetch, 2, side)
    for layer in range(2):
        pf.get(layer)
        log.append(f"compute {layer}")
    assert log == [
        "side waits compute", "enter side", "fetch 0", "exit side",
        "compute waits side", "record on compute", "record on compute",
        "side waits compute", "enter side", "fetch 1", "exit side", "compute 0",
        "compute waits side", "record on compute", "record on compute", "compute 1",
    ]


def test_step_down_runs_after_the_failed_attempt_is_freed(tiny_model, monkeypatch):
    """An out-of-memory in the middle of a layer (host K/V cache, fetches pending): by the time the engine
    steps down, the failed attempt's activations are gone (inside the `except`, its traceback would keep
    them, and emptying the CUDA cache would release nothing); the call then equals n=1 from the start."""
    cfg = tiny_model.config
    x, lr_up, lr, vec = _inputs(cfg)
    alive, seen, raised = [], [], []
    real_out, real_step_down = tiny_model.layer_out, engine_mod.step_down

    def layer_out(i, h, *a, **k):
        if i == 1 and not raised:  # layer 1 of the first rectangle: layer 0's K/V already in the cache
            raised.append(True)
            alive.append(weakref.ref(h._base))  # the rectangle's tokens, a local of the failed frames
            raise torch.OutOfMemoryError("simulated")
        return real_out(i, h, *a, **k)

    def step_down(p, gh, gw):
        seen.append([r() is None for r in alive])
        return real_step_down(p, gh, gw)

    monkeypatch.setattr(tiny_model, "layer_out", layer_out)
    monkeypatch.setattr(engine_mod, "step_down", step_down)
    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=2, cache_on_host=True))
    out = eng(x, 1.7)
    assert seen == [[True]]
    assert eng.placement.n == 1
    monkeypatch.undo()
    assert torch.equal(out, denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=1,
                                    cache_device="cpu"))


def test_edm_constants_are_float64_rounded_once():
    """c_in, c_out, c_skip are computed in float64 on the CPU and rounded once, whatever device sigma is on:
    a state on the host and one on the GPU then see the same constants (float32 maths differs in the
    last bit for some sigmas)."""
    sigma = torch.cat([edm_sigmas(20)[:-1], torch.logspace(-3, 1.7, 300)]).float()
    from infdit_cli.model.infdit import random_model

    model = random_model(PRESETS["tiny"])
    step = model.prepare_step(sigma, torch.zeros(len(sigma), model.config.vector_dim))
    want = [c.float() for c in edm_scalings(sigma.double(), model.config.sigma_data)[:3]]
    for got, ref in zip((step.c_skip, step.c_out, step.c_in), want):
        assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_bf16_state_keeps_float32_sigmas():
    """A bf16 sampler state must not round the sigmas (or the steps between them) to bf16."""
    seen = []

    def den(x, sigma):
        seen.append(sigma.clone())
        return torch.zeros_like(x)

    sigmas = edm_sigmas(4)
    sample_heun(den, torch.zeros(1, 3, 4, 4, dtype=torch.bfloat16), sigmas)
    want = [sigmas[0], sigmas[1], sigmas[1], sigmas[2], sigmas[2], sigmas[3], sigmas[3]]
    assert all(s.dtype == torch.float32 for s in seen)
    assert [float(s[0]) for s in seen] == [float(s) for s in want]


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_patch_embedding_is_one_matmul(tiny_model):
    """The stride = kernel patch embedding runs as a matmul (no convolution: cuDNN's 32-bit indexing fails
    past 2^31 output elements, n ~ 46 at the official width) with the convolution's numbers."""
    cfg = tiny_model.config
    xin = torch.randn(1, cfg.in_channels, 2 * cfg.block_size, 3 * cfg.block_size)
    with _Ops() as ops:
        got = tiny_model.embed(xin)
    assert not [n for n in ops.names if "convolution" in n]
    conv = F.conv2d(xin, tiny_model.x_embedder.weight, tiny_model.x_embedder.bias, stride=cfg.patch_size)
    bt = cfg.block_tokens
    ref = conv.unflatten(2, (2, bt)).unflatten(4, (3, bt)).permute(0, 2, 4, 3, 5, 1).flatten(3, 4)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)  # float32 sums in another order


class _FakeCudart:
    class cudaError:  # noqa: N801 - the real enum's name
        success = 0

    def __init__(self, answer: int, log: list) -> None:
        self.answer, self.log = answer, log

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802
        self.log.append(("register", ptr, size))
        return self.answer

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.log.append(("unregister", ptr))
        return 0


def test_host_cache_is_pinned_in_place_for_as_long_as_it_lives(monkeypatch):
    """The cache's pages are registered as they are (exactly their bytes: the pinned allocator would round
    a slab up to a power of two and keep it after it is freed), and unregistered, after the device is
    synchronised, before the memory is freed."""
    log: list = []
    monkeypatch.setattr(storage_mod, "_cuda_driver", lambda: None)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(0, log))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("synchronize",)))
    scratch = Scratch(pin=True)
    t = scratch.empty("kv_cache", (3, 1000), torch.float32)
    ptr = t.data_ptr()
    assert log == [("register", ptr, 12000)] and scratch.pin
    freed = weakref.ref(t)
    del t
    assert freed() is not None  # still held for the unregistering
    del scratch
    assert log[1:] == [("synchronize",), ("unregister", ptr)] and freed() is None


def test_pinning_refused_falls_back_to_ordinary_memory(monkeypatch):
    """cudaHostRegister can refuse (page-locked memory is limited, some sandboxed runtimes refuse it); that
    is no out-of-memory the ladder would see. The cache then lives in ordinary memory instead of failing the
    job, and the runtime's last error, which the refusal set, is cleared: left set, the next kernel launch's
    check would report it as its own."""
    log: list = []
    monkeypatch.setattr(storage_mod, "_cuda_driver", lambda: None)
    monkeypatch.setattr(storage_mod, "_clear_runtime_error", lambda: log.append(("clear",)))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(2, log))  # cudaErrorMemoryAllocation
    scratch = Scratch(pin=True)
    t = scratch.empty("kv_cache", (2, 3), torch.float32)
    assert t.shape == (2, 3) and scratch.pin is False
    assert [e[0] for e in log] == ["register", "clear"]
    log.clear()
    assert Scratch(pin=True).empty("kv_cache", (2,), torch.float32).shape == (2,)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: (_ for _ in ()).throw(AssertionError("no CUDA")))
    assert Scratch(pin=True).empty("kv_cache", (2,), torch.float32).shape == (2,)  # a CPU-only build


class _FakeDriverLib:
    """libcuda's three entry points, as ctypes would call them."""

    def __init__(self, answer: int, log: list, context: bool = True) -> None:
        self.answer, self.log, self.context = answer, log, context

    def cuCtxGetCurrent(self, ref):  # noqa: N802
        ref._obj.value = 1234 if self.context else None
        return 0

    def cuMemHostRegister_v2(self, ptr, size, flags):  # noqa: N802
        self.log.append(("cuMemHostRegister", ptr.value, size.value, flags.value))
        return self.answer

    def cuMemHostUnregister(self, ptr):  # noqa: N802
        self.log.append(("cuMemHostUnregister", ptr.value))
        return 0


def test_pinning_goes_through_the_driver_where_it_can(monkeypatch):
    """With the driver at hand the slab is registered and unregistered through it (its refusals leave no
    error state behind), the runtime is never asked; a refusal there is plain ordinary memory. The pages
    are registered portable and mapped (CU_MEMHOSTREGISTER_PORTABLE | _DEVICEMAP = 1 | 2): with flags 0
    they would be pinned for the current context only, as the runtime's cudaHostRegister(.., 0) is not
    (portable and mapped on UVA systems)."""
    log: list = []

    def no_runtime():
        raise AssertionError("the runtime was asked")

    monkeypatch.setattr(torch.cuda, "cudart", no_runtime)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("synchronize",)))
    monkeypatch.setattr(storage_mod, "_cuda_driver", lambda: storage_mod._Driver(_FakeDriverLib(0, log)))
    scratch = Scratch(pin=True)
    t = scratch.empty("kv_cache", (4, 10), torch.float32)
    ptr = t.data_ptr()
    assert log == [("cuMemHostRegister", ptr, 160, 1 | 2)] and scratch.pin
    del t, scratch
    assert log[1:] == [("synchronize",), ("cuMemHostUnregister", ptr)]

    log.clear()
    monkeypatch.setattr(storage_mod, "_cuda_driver", lambda: storage_mod._Driver(_FakeDriverLib(2, log)))
    scratch = Scratch(pin=True)
    assert scratch.empty("kv_cache", (4,), torch.float32).shape == (4,) and scratch.pin is False
    assert [e[0] for e in log] == ["cuMemHostRegister"]

    # no context current even after a runtime call: the runtime's path, its refusal cleared
    log.clear()
    monkeypatch.setattr(storage_mod, "_cuda_driver",
                        lambda: storage_mod._Driver(_FakeDriverLib(0, log, context=False)))
    monkeypatch.setattr(storage_mod, "_clear_runtime_error", lambda: log.append(("clear",)))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(2, log))
    assert Scratch(pin=True).empty("kv_cache", (4,), torch.float32).shape == (4,)
    assert [e[0] for e in log] == ["synchronize", "register", "clear"]


def test_clearing_the_runtime_error_without_cuda_is_harmless():
    storage_mod._clear_runtime_error()  # no libcudart mapped here: nothing to read, no exception


def test_host_memory_override(monkeypatch):
    from infdit_cli.errors import BadRequest

    monkeypatch.setenv("INFDIT_HOST_MEMORY", "96GB")
    assert host_available() == 96 * 2**30
    monkeypatch.setenv("INFDIT_HOST_MEMORY", "lots")
    with pytest.raises(BadRequest, match="INFDIT_HOST_MEMORY"):
        host_available()


def test_inductor_on_the_cpu_equals_eager(tiny_model):
    """`compile=True` is Inductor: generated kernels (C++ on the CPU) give the eager pixels."""
    pytest.importorskip("torch._inductor")
    cfg = tiny_model.config
    x, lr_up, lr, vec = _inputs(cfg)
    eager = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=2)
    compiled = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=2, compile=True)
    torch.testing.assert_close(compiled, eager, atol=2e-6, rtol=0)


class _Event:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def synchronize(self) -> None:
        self.log.append(("cpu waits", self.name))


class _RecordingStream:
    """A CUDA stream's ordering calls, recorded; the work itself runs inline."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.events = name, log, 0

    def wait_stream(self, other) -> None:
        self.log.append((f"{self.name} waits", other.name))

    def wait_event(self, ev) -> None:
        self.log.append((f"{self.name} waits", ev.name))

    def record_event(self):
        self.events += 1
        ev = _Event(f"{self.name}#{self.events}", self.log)
        self.log.append(("record", ev.name))
        return ev

    def synchronize(self) -> None:
        self.log.append(("cpu waits", self.name))


def test_host_cache_puts_run_on_the_copy_stream_in_order(tiny_model, monkeypatch):
    """A host-side cache next to a GPU, with the streams' calls recorded (the work runs inline on the CPU):
    every put is queued on the copy stream after it waited for the compute stream (the K/V were just
    computed); a layer's puts end with an event which the compute stream waits for before the next layer
    (or rectangle) rewrites the key/value tables the puts read; freed slots carry an event that covers
    their last put; and the call's result is the one without streams."""
    cfg = tiny_model.config
    x, lr_up, lr, vec = _inputs(cfg, 64, 96)
    log: list = []
    copy, compute = _RecordingStream("copy", log), _RecordingStream("compute", log)
    current = []

    @contextlib.contextmanager
    def on(stream):
        current.append(stream.name)
        log.append(("enter", stream.name))
        yield
        current.pop()
        log.append(("exit", stream.name))

    real_put, real_qkv = engine_mod.KVCache.put, tiny_model.layer_qkv

    def put(self, block, layer, k, v):
        log.append(("put", block, layer, current[-1] if current else None, self.index.get(block)))
        return real_put(self, block, layer, k, v)

    def layer_qkv(i, *a, **k):
        log.append(("qkv", i))
        return real_qkv(i, *a, **k)

    monkeypatch.setattr(engine_mod, "_copy_streams", lambda device: (copy, device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(engine_mod.KVCache, "put", put)
    monkeypatch.setattr(tiny_model, "layer_qkv", layer_qkv)
    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=2, cache_on_host=True))
    got = eng(x, 1.7)
    monkeypatch.undo()
    assert torch.equal(got, denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=2,
                                    cache_device="cpu"))
    puts = [i for i, e in enumerate(log) if e[0] == "put"]
    assert puts and all(log[i][3] == "copy" for i in puts)  # every put on the copy stream
    unwaited = None  # the event of puts the compute stream has not waited for yet
    waited_copy_start = False
    for e in log:
        if e == ("copy waits", "compute"):
            waited_copy_start = True
        elif e[0] == "put":
            assert waited_copy_start  # the copy stream waited for the compute stream before its puts
        elif e[0] == "record" and e[1].startswith("copy"):
            unwaited, waited_copy_start = e[1], False
        elif e[0] == "compute waits":
            if e[1] == unwaited:
                unwaited = None
        elif e[0] == "qkv":
            assert unwaited is None  # the tables the puts read are rewritten only after they ran
        elif e[0] == "record" and e[1].startswith("compute"):
            assert unwaited is None  # an eviction's event covers the freed slots' last puts
    # a slot written again (after its block was evicted) was freed behind an event
    assert any(e[0] == "record" and e[1].startswith("compute") for e in log)
    eng.close()
    assert log[-1] == ("cpu waits", "copy")  # closing waits for the puts before their buffers go


def test_a_received_slot_is_written_by_the_cpu_only_after_the_device_is_done_with_it():
    """`claim(host_write=True)` (a band's received left edge, written by the CPU) of a slot freed behind an
    event waits for that event first; a put's slot is ready for the CPU once its event is waited for."""
    log: list = []
    cache = engine_mod.KVCache(2, (1, 2, 1, 1, 1, 1), torch.float32, torch.device("cpu"))
    slot = cache.claim((0, 0))
    cache.mark([slot], _Event("copy#1", log))
    cache.evict([(0, 0)], _Event("compute#1", log))  # freed behind the rectangle's reads
    assert cache.claim((5, 5)) == slot and log == []  # a device writer: ordered by the streams, no CPU wait
    cache.evict([(5, 5)], _Event("compute#2", log))
    again = cache.claim((1, 0), host_write=True)
    assert again == slot and log == [("cpu waits", "compute#2")]
    cache.mark([again], _Event("copy#2", log))
    cache.host_ready([again])
    cache.host_ready([again])  # once only
    assert log[1:] == [("cpu waits", "copy#2")]


def test_the_wavelet_colour_fix_in_row_bands_is_the_whole_image_s():
    """In row bands (each with the blur's 31-row reach above and below) the fix gives the whole image's
    numbers to the bit, with the reference a tensor or computed band by band (`Upsampled`): a GPU then never
    runs one convolution over a whole image past 32-bit indexing."""
    from infdit_cli.jobs.pipeline import Upsampled, _low_freq, color_fix

    g = torch.Generator().manual_seed(0)
    src = torch.rand(1, 3, 75, 50, generator=g) * 2 - 1
    ref = Upsampled(src, (300, 200))
    out = torch.rand(1, 3, 300, 200, generator=g) * 2.2 - 1.1
    whole_ref = ref[..., :, :]
    want = (out - _low_freq(out) + _low_freq(whole_ref)).clamp(-1, 1)
    assert torch.equal(color_fix(out, ref, "wavelet"), want)
    from infdit_cli.jobs import pipeline

    for budget in (3 * 4 * 200 * 7, 3 * 4 * 200 * 40):  # 7-row and 40-row bands: halos wider and narrower
        assert len(pipeline._rows(300, 200, budget)) > 5
        assert torch.equal(pipeline._wavelet_fix(out, ref, budget=budget), want)
        assert torch.equal(pipeline._wavelet_fix(out, whole_ref, budget=budget), want)


def test_host_cache_is_made_and_freed_on_the_models_gpu(tiny_model, monkeypatch):
    """With the model on cuda:1, the host slab is pinned, and unpinned, with cuda:1 the current device:
    the driver registers in the current context, and a runtime call without one (`torch.cuda.synchronize()`)
    would bind GPU 0's and pin there (and wait for the wrong GPU's copies before unpinning)."""
    cfg = tiny_model.config
    x, lr_up, lr, vec = _inputs(cfg, 64, 96)
    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=2, cache_on_host=True))
    gpu1 = torch.device("cuda", 1)
    eng.model = type("OnGpu1", (), {"device": gpu1, "dtype": torch.float32})()
    current: list = [None]
    seen: list = []

    @contextlib.contextmanager
    def on(device):
        current.append(torch.device(device))
        yield
        current.pop()

    def pin(t):
        seen.append(("pin", current[-1]))
        return lambda t: seen.append(("unpin", current[-1]))

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    monkeypatch.setattr(engine_mod, "_copy_streams", lambda device: (None, None))
    monkeypatch.setattr(storage_mod, "_pin", pin)
    assert eng.prepare() is not None
    assert seen == [("pin", gpu1)]
    eng.close()
    assert seen == [("pin", gpu1), ("unpin", gpu1)]


def test_puts_order_against_the_stream_current_when_they_run(monkeypatch):
    """The compute stream is read when it is needed, not fixed when the cache was made: a caller that runs
    the engine under another stream gets its puts ordered after, and its tables guarded on, that stream."""
    log: list = []
    copy = _RecordingStream("copy", log)
    streams = {"now": _RecordingStream("first", log)}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams["now"])
    puts = engine_mod._Puts(copy, torch.device("cuda", 0))
    streams["now"] = _RecordingStream("second", log)
    puts.start()
    ev = puts.finish()
    puts.before_table_write()
    assert log == [("copy waits", "second"), ("record", ev.name), ("second waits", ev.name)]


def test_attention_bound_is_a_bf16_kernels_error_not_the_outputs_rounding():
    """The SDPA row's bound (on the CPU: the math backend is there): the reference is the float64 attention
    of the bf16 inputs and the bound `ratio` x the error of the math backend computing in bf16. The math
    backend's default (torch >= 2.5: bf16 inputs computed in float32) errs by little more than the output's
    rounding; a bound on that (1.5x) leaves a fused kernel that rounds its softmax weights to bf16 (emulated
    here) little room (here 1.4x of the 1.5x), and fails it on other shapes for no fault of its own."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from infdit_cli.plan.sdpa import measure_backends

    got = measure_backends("cpu", batch=2, heads=4, queries=128, keys=2048, backends=())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 80, generator=g, dtype=torch.bfloat16) for n in (128, 2048, 2048))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with sdpa_kernel(SDPBackend.MATH):
        default_math = (F.scaled_dot_product_attention(q, k, v).double() - exact).pow(2).mean().sqrt().item()
    weights = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / 80**0.5, -1).bfloat16().float()
    flash_like = ((weights @ v.float()).bfloat16().double() - exact).pow(2).mean().sqrt().item()
    assert flash_like <= got["bound"] and got["bound"] >= 2 * default_math  # was 1.5 x default_math


def test_rope_makes_its_frequencies_once_per_device(tiny_model, monkeypatch):
    """The RoPE angles of every rectangle use one frequency table per device: making it anew (a copy from
    pageable host memory to the GPU, which waits for the stream's queued work) once per rectangle would
    stall the CPU on the GPU. The angles are the same numbers either way."""
    import infdit_cli.model.layers as layers

    want = [tiny_model.rope(range(r, r + 2), range(c, c + 3)) for r, c in ((0, 0), (1, 2), (3, 1))]
    layers._frequencies_on.cache_clear()
    made = []
    real = layers.rope_frequencies
    monkeypatch.setattr(layers, "rope_frequencies", lambda hd: made.append(hd) or real(hd))
    for (r, c), (cos, ssin) in zip(((0, 0), (1, 2), (3, 1)), want, strict=True):
        got = tiny_model.rope(range(r, r + 2), range(c, c + 3))
        assert torch.equal(got[0], cos) and torch.equal(got[1], ssin)
    assert made == [tiny_model.config.head_dim]


def test_the_engine_computes_under_its_attention_backend(tiny_model, monkeypatch):
    """`BlockEngine(attention=...)` runs each call inside `plan.sdpa.prefer` of that backend (the
    calibration's choice), and None leaves torch's order; the CPU's numbers are the same either way."""
    from contextlib import contextmanager

    from infdit_cli.plan import sdpa

    cfg = tiny_model.config
    x, lr_up, lr, vec = _inputs(cfg)
    preferred = []
    real = sdpa.prefer

    @contextmanager
    def prefer(name):
        preferred.append(name)
        with real(name):
            yield

    monkeypatch.setattr(engine_mod, "prefer", prefer)
    outs = [BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=2), attention=a)(x, 1.0)
            for a in ("efficient", None)]
    assert preferred == ["efficient", None]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_prefer_puts_the_backend_first_and_keeps_the_others_behind_it():
    from infdit_cli.plan.sdpa import prefer

    order = torch._C._get_sdp_priority_order
    before = order()
    with prefer("cudnn"):
        inside = order()
    assert order() == before
    assert inside[0] == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    assert sorted(inside) == sorted(before)
    q = torch.randn(1, 2, 8, 16)
    with prefer("flash"):  # no flash kernel on the CPU: the math backend behind it still answers
        torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q),
                                   torch.nn.functional.scaled_dot_product_attention(q, q, q))
