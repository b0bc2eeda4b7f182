"""kbit.optim: 32-bit and 8-bit optimizers with bitsandbytes' API and state format.

Every optimizer comes as ``Name`` (``optim_bits`` chooses), ``Name8bit``, ``Name32bit`` and, where
bitsandbytes has them, ``PagedName*`` (on CPU their state lives in memory-mapped files: paged.py).
kbit adds 4-bit state for Adam, AdamW and Lion (``Adam4bit``, ``AdamW4bit``, ``Lion4bit``, paged variants;
``optim_bits=4``) and bf16 stochastic rounding for every optimizer (``bf16_stochastic_round=True``). State
is updated by fused native kernels on CPU (one pass over
memory per parameter) and by the pure-PyTorch reference on other devices.
"""

from .adagrad import Adagrad, Adagrad8bit, Adagrad32bit
from .adam import (
    Adam,
    Adam4bit,
    Adam8bit,
    Adam32bit,
    AdamW,
    AdamW4bit,
    AdamW8bit,
    AdamW32bit,
    PagedAdam,
    PagedAdam4bit,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW4bit,
    PagedAdamW8bit,
    PagedAdamW32bit,
)
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit
from .lamb import LAMB, LAMB8bit, LAMB32bit
from .lars import LARS, LARS8bit, LARS32bit, PytorchLARS
from .lion import Lion, Lion4bit, Lion8bit, Lion32bit, PagedLion, PagedLion4bit, PagedLion8bit, PagedLion32bit
from .health import NonFiniteState, find_nonfinite_state, reset_nonfinite_state
from .manager import GlobalOptimManager
from .optimizer import MockArgs, Optimizer1State, Optimizer2State, Optimizer8bit
from .paged import get_paged_state_dir, set_paged_state_dir
from .rmsprop import RMSprop, RMSprop8bit, RMSprop32bit
from .sgd import SGD, SGD8bit, SGD32bit

__all__ = [
    "Adagrad", "Adagrad8bit", "Adagrad32bit",
    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
    "Adam4bit", "AdamW4bit", "PagedAdam4bit", "PagedAdamW4bit", "Lion4bit", "PagedLion4bit",
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit",
    "LAMB", "LAMB8bit", "LAMB32bit",
    "LARS", "LARS8bit", "LARS32bit", "PytorchLARS",
    "Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit",
    "GlobalOptimManager", "get_paged_state_dir", "set_paged_state_dir", "MockArgs", "Optimizer8bit", "Optimizer2State", "Optimizer1State",
    "RMSprop", "RMSprop8bit", "RMSprop32bit",
    "SGD", "SGD8bit", "SGD32bit",
    "NonFiniteState", "find_nonfinite_state", "reset_nonfinite_state",
]
