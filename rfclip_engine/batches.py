"""Items that share the encoder's batches, run so that one that fails is lost alone: a group of
images out of device memory beside a large one, or a task whose regions cannot be made, costs
that item, not its batch and the run. `rfclip segment`, `rfclip eval` and the backend's pipeline
all go through here."""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Type, TypeVar, Union

T = TypeVar("T")
R = TypeVar("R")
# torch's out-of-memory errors are RuntimeErrors
OUT_OF_MEMORY: Tuple[Type[BaseException], ...] = (RuntimeError, MemoryError)


def run_isolated(items: Sequence[T], run: Callable[[Sequence[T]], Sequence[R]],
                 errors: Tuple[Type[BaseException], ...] = OUT_OF_MEMORY) -> List[Union[R, BaseException]]:
    """`run(items)`'s results, one per item; where it raises one of `errors`, each item is run
    alone, and an item that fails alone gets its error in its place."""
    if not items:
        return []
    try:
        return list(run(items))
    except errors as err:
        if len(items) == 1:
            return [err]
    return [outcome for item in items for outcome in run_isolated([item], run, errors)]


def reason(err: BaseException) -> str:
    """One line: torch's memory errors go on with the allocator's advice."""
    first_line = str(err).partition("\n")[0]
    return f"{type(err).__name__}: {first_line}"
