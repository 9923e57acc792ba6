"""Make Any2Point a first-class peft method: a `PeftType` member plus peft's own registration."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


METHOD_NAME = "any2point"


def _add_peft_type_member(name: str) -> PeftType:
    """Add `name` to peft's closed `PeftType` str-Enum, the way `Enum` itself builds members.

    peft looks methods up by `PeftType` member, and the enum cannot be subclassed or extended through its public
    API, so the member is created and entered into the enum's own tables.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register() -> None:
    """Register Any2Point with peft; calling it again is harmless."""
    from peft_any2point.config import Any2PointConfig
    from peft_any2point.model import Any2PointModel

    peft_type = _add_peft_type_member(METHOD_NAME.upper())
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(
            name=METHOD_NAME, config_cls=Any2PointConfig, model_cls=Any2PointModel, prefix=Any2PointModel.prefix
        )
