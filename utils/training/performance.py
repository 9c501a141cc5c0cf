"""Speed settings applied to a training run: backends, memory format, compilation, data loading.

Each function reads :class:`utils.config.experiment.PerformanceConfig` and changes how fast the
same computation runs, never what it computes (beyond floating-point rounding):

* :func:`resolve_precision`: what ``training.mixed_precision: auto`` means on this device (bf16 on
  GPUs that compute it, fp16 on older GPUs, float32 on CPUs), and a refusal of bf16 on a CPU
  that would emulate it;
* :func:`configure_backends`: cuDNN autotuning and TensorFloat-32 on GPUs;
* :func:`memory_format`: channels-last (``torch.channels_last_3d`` for 3D models) for the model
  and its inputs, so bf16 convolutions run on tensor cores without layout conversions;
* :class:`CompiledForward`: ``torch.compile`` of the training forward pass, falling back to the
  plain module, with a warning naming the error, when compilation fails (no compiler, an
  unsupported operation): a run never dies because the compiler did;
* :func:`loader_options`: pinned memory, prefetching and persistent workers of the DataLoader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from utils.config.experiment import ExperimentConfig, PerformanceConfig
from utils.training.stop_signals import ignore_stop_signals

logger = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(setting: str, device: torch.device, allow_emulated_bf16: bool = False) -> str:
    """accelerate's ``mixed_precision`` for the config's ``training.mixed_precision`` on ``device``.

    ``"auto"``: ``"bf16"`` on a GPU that computes it, ``"fp16"`` (with the gradient scaler) on
    an older GPU, ``"no"`` (float32) on a CPU. bf16 on a CPU is opt-in (``"bf16"``): faster on
    CPUs with AVX512-BF16 or AMX, but its convolution backward pass has returned NaN weight
    gradients for small networks there (README "Speed"), which the training step refuses to
    apply. Any other setting is returned as it is, except bf16 on a CPU that would emulate it.

    Raises:
        ValueError: ``"bf16"`` on a CPU without AVX512-BF16 or AMX and not ``allow_emulated_bf16``:
            emulated bf16 runs many times slower than float32 (README "bf16 on a CPU" has the
            figure), so a run of minutes takes hours and looks like a hung job.
    """
    if setting == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if native_bf16(device) else "fp16"
    if setting == "bf16" and device.type == "cpu" and not native_bf16(device):
        if not allow_emulated_bf16:
            raise ValueError("training.mixed_precision is bf16, but this CPU has neither AVX512-BF16 nor AMX: "
                             "bf16 would be emulated in software, several times slower than float32. Use "
                             "training.mixed_precision=no (or auto), or set performance.allow_emulated_bf16=true "
                             "to run it anyway")
        logger.warning("mixed_precision bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there and "
                       "several times slower than float32 (performance.allow_emulated_bf16 is set)")
    return setting


def training_device() -> torch.device:
    """The device a training run uses: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def experiment_precision(config: ExperimentConfig, device: torch.device | None = None) -> str:
    """accelerate's ``mixed_precision`` for ``config`` on ``device`` (the training device by default).

    Raises:
        ValueError: bf16 on a CPU that would emulate it (:func:`resolve_precision`).
    """
    return resolve_precision(config.training.mixed_precision, device or training_device(),
                             config.performance.allow_emulated_bf16)


def build_accelerator_for(precision: str, device: torch.device) -> Accelerator:
    """An ``Accelerator`` with ``precision``, also after an earlier one of this process used another.

    accelerate keeps the mixed precision in a process-wide singleton (``AcceleratorState``) and
    refuses to change it: a notebook that trains a float32 model and then a bf16 one in the same
    kernel, or the benchmark measuring settings of several precisions, would fail on the second.
    In a single process that state is reset first (``AcceleratorState._reset_state()``, as
    accelerate's own tests do); the ``PartialState`` (device, process group) is kept. An
    ``Accelerator`` built earlier with another precision must not be used after this call.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def configure_backends(performance: PerformanceConfig, device: torch.device) -> None:
    """cuDNN benchmark mode and TF32 as configured (no effect on the CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = performance.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = performance.tf32
    torch.backends.cudnn.allow_tf32 = performance.tf32


def memory_format(performance: PerformanceConfig, spatial_dims: int) -> torch.memory_format:
    """The memory format of the model's weights and inputs: channels-last when configured."""
    if not performance.channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


class CompiledForward:
    """Call ``module`` through ``torch.compile`` when configured, and plainly when compiling fails.

    Compilation happens at the first call (and again for a new input shape); an exception there
    is logged as a warning and every later call uses ``module`` directly. The module itself is
    unchanged: its ``state_dict`` keys, checkpoints and evaluation are the same either way.

    Args:
        module: the (possibly data-parallel) model.
        performance: ``compile`` and ``compile_mode``.
        backend: ``torch.compile`` backend (``"inductor"``; tests pass others).
    """

    def __init__(self, module: torch.nn.Module, performance: PerformanceConfig, *,
                 backend: str | Callable = "inductor"):
        self.module = module
        self.compiled: Callable[..., Any] | None = None
        self.failure: str | None = None
        if performance.compile:
            options = {"mode": performance.compile_mode} if backend == "inductor" else {}
            self.compiled = torch.compile(module, backend=backend, **options)

    @property
    def is_compiled(self) -> bool:
        """Whether calls currently go through the compiled module."""
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.module(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # any compiler failure: keep training, uncompiled
            self.failure = _describe(error)
            logger.warning("torch.compile failed (%s); training continues without compilation "
                           "(set performance.compile=false to skip the attempt)", self.failure)
            self.compiled = None
            return self.module(*args, **kwargs)


def _describe(error: BaseException) -> str:
    """``Type: first line`` of the error that made compilation fail (the compiler's own wrapper unwrapped)."""
    cause = getattr(error, "inner_exception", None) or error.__cause__ or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0].strip() if lines else ''}"


def loader_options(performance: PerformanceConfig, num_workers: int, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of the training ``DataLoader`` for the speed settings.

    Pinned memory only when batches go to a GPU; prefetching and persistent workers only with
    workers, which ignore stop signals (the training process checkpoints and stops them).
    """
    options: dict[str, Any] = {"num_workers": num_workers,
                               "pin_memory": performance.pin_memory and device.type == "cuda",
                               "persistent_workers": num_workers > 0}
    if num_workers > 0:
        options.update(prefetch_factor=performance.prefetch_factor, worker_init_fn=ignore_stop_signals)
    return options
