"""How the 8-bit, 32-bit and Paged variants of an optimizer are declared: a subclass setting one or two
class attributes. ``Adam8bit`` is ``Adam`` with ``_FORCED_BITS = 8``, not a copy of it."""

from __future__ import annotations


class Variant:
    """Mixin read by every concrete optimizer's constructor."""

    #: bits the class always uses (None: the `optim_bits` argument decides)
    _FORCED_BITS: int | None = None
    #: whether the class always uses paged state
    _FORCED_PAGED: bool = False

    @classmethod
    def _bits(cls, optim_bits: int) -> int:
        if cls._FORCED_BITS is None:
            return optim_bits
        if optim_bits not in (32, cls._FORCED_BITS):  # 32 is the signature's default
            raise ValueError(
                f"{cls.__name__} always uses {cls._FORCED_BITS}-bit state; optim_bits={optim_bits} contradicts it "
                f"(use {cls.__mro__[1].__name__}(optim_bits=...) to choose)"
            )
        return cls._FORCED_BITS

    @classmethod
    def _paged(cls, is_paged: bool) -> bool:
        return True if cls._FORCED_PAGED else bool(is_paged)


def reject_amsgrad(cls_name: str, amsgrad: bool) -> None:
    if amsgrad:
        raise ValueError(f"{cls_name} does not support amsgrad=True (it is not implemented; bitsandbytes ignores it)")
