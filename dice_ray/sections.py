"""Config sections: the typed, validated pieces a run config is made of, and what a method's options are.

A ``Section`` refuses unknown keys and turns every validation problem into one ``InputError`` line that names the
field (``config: ledger.hops: …``), also when it is built in Python. The run config's sections
(``dice_ray.config``) and a method's own options (``hooks.Method.options``) subclass it.
"""

from __future__ import annotations

import contextvars
import difflib
from collections import Counter
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from dice_ray.errors import InputError


def comma_list(value: Any) -> Any:
    """A comma-separated string from the command line as a list of its non-empty items; anything else as it is."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types an annotation is made of (``int | None``: int and NoneType; ``Annotated[int, ...]``: int)."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    if getattr(annotation, "__metadata__", None) is not None:  # Annotated[T, ...]: T
        return _leaf_types(args[0])
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(_leaf_types(a) for a in args))
    return {get_origin(annotation)}


def check_keys(value: Any, path: str = "") -> None:
    """Raise an ``InputError`` naming the first mapping key in ``value`` (nested dicts and lists) that is not a string:
    a config's keys are field names, and pydantic failed on another key with a TypeError traceback. YAML reads an
    unquoted on, off, yes or no as a boolean, so ``optim: {on: 1}`` is such a key."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if not isinstance(key, str):
                hint = " (YAML reads an unquoted on, off, yes or no as true or false)" if isinstance(key, bool) else ""
                raise InputError(f"config: {path or 'top level'}: key {key!r} is not a name{hint}: quote it")
            check_keys(inner, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            check_keys(inner, f"{path}.{i}")


# True while a config recorded in a run, checkpoint or sweep directory is read (``config.read_recorded``): what it
# records is taken as recorded, also what earlier versions accepted and this one refuses. A context variable, not
# pydantic's validation context: sections with their own ``__init__`` do not pass that on.
RECORDED: contextvars.ContextVar[bool] = contextvars.ContextVar("recorded", default=False)


def distinct(value: list[Any] | None) -> list[Any] | None:
    """A list as given, refused if it names an item twice (a participant or round listed twice is a slip: it
    would count once); a recorded config's list is taken as recorded (earlier versions accepted repeats)."""
    twice = [item for item, times in Counter(value or []).items() if times > 1]
    if twice and not RECORDED.get():
        raise ValueError(f"lists {twice[0]!r} twice: {value}")
    return value


# Participant ids or round numbers, each once (or None: ``Ids``). The validator is on the whole field, so the field's
# type reads as it is (list[int] | None) in the reference.
IdList = Annotated[list[int], AfterValidator(distinct)]
Ids = Annotated[list[int] | None, AfterValidator(distinct)]


class Section(BaseModel):
    """A config section: unknown keys are refused, and a bad value raises ``InputError`` with one line that
    names the field (also when built in Python: ``RunConfig(nodes=1)``)."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)

    def __init__(self, /, **data: Any) -> None:
        check_keys(data)
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise one_line(err, type(self)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _no_truth_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse true or false for a number field (pydantic reads them as 1 and 0: ``rounds: true`` ran one round;
        YAML reads an unquoted yes or on as true)."""
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"{str(value).lower()} is not a number")
        return value

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """Validate ``obj`` (a nested dict); raise ``InputError`` with one line on bad input."""
        check_keys(obj)
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise one_line(err, cls) from None

    def check(self, config: Any) -> None:
        """The rules between this section and the rest of the run ``config`` (another method's section, the number
        of participants, …), checked once every section is valid: raise ``ValueError`` with one line. A method's
        options override it to check their own cross-method rules; the default checks nothing."""

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise one_line(err) from None


class FieldError(InputError):
    """A section's one-line error, with where it happened (so an enclosing section can prefix its own field).
    For an unknown key (``extra``) the message is what follows the key: a suggestion (``did_you_mean``), or empty."""

    def __init__(self, loc: tuple, message: str, extra: bool = False):
        self.loc, self.message, self.extra = loc, message, extra
        where = ".".join(str(p) for p in loc)
        if extra:
            super().__init__(f"config: unknown key {where!r}{message}")
        else:  # a rule between fields names them itself
            super().__init__(f"config: {where}: {message}" if where else f"config: {message}")


def did_you_mean(key: str, known: Any) -> str:
    """' (did you mean 'k'?)' for the closest of ``known`` keys to an unknown ``key``, or ''."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(section: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the section that ``loc`` (a path of field names) leads to from ``section``."""
    for part in loc:
        field = getattr(section, "model_fields", {}).get(part)
        if field is None:
            return []
        kinds = (field.annotation, *get_args(field.annotation))
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
    return list(getattr(section, "model_fields", {}))


def one_line(err: ValidationError, section: type[BaseModel] | None = None) -> FieldError:
    """Return the first problem of a pydantic error as 'config: field.path: message (got value)' (an unknown key
    of ``section``, or of a section in it, with the closest known key)."""
    first = err.errors()[0]
    inner = first.get("ctx", {}).get("error")
    if isinstance(inner, FieldError):  # a nested section built by its own __init__ reported it
        return FieldError(tuple(first["loc"]) + inner.loc, inner.message, inner.extra)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        loc = tuple(first["loc"])
        return FieldError(loc, did_you_mean(loc[-1], _fields_at(section, loc[:-1])), extra=True)
    got = first.get("input")
    suffix = "" if isinstance(got, dict) or got is None or repr(got) in msg else f" (got {got!r})"
    return FieldError(tuple(first["loc"]), f"{msg}{suffix}")
