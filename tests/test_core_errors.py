from __future__ import annotations

import pytest

import llmslim as ls
from llmslim import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigError, ValueError),
        (errors.TargetError, LookupError),
        (errors.RegistryError, LookupError),
        (errors.OrderError, ValueError),
        (errors.PassError, RuntimeError),
        (errors.CalibrationError, RuntimeError),
        (errors.CheckpointError, OSError),
        (errors.FetchError, OSError),
        (errors.MissingDependencyError, ImportError),
    ],
)
def test_flat_tree_with_builtins(cls, builtin) -> None:
    assert cls.__bases__[0] is errors.LlmslimError
    assert issubclass(cls, builtin)


def test_every_public_error_is_listed() -> None:
    public = {n for n in dir(errors) if isinstance(getattr(errors, n), type) and issubclass(getattr(errors, n), Exception)}
    assert public == set(errors.__all__)


def test_pass_error_message_names_pass_module_and_history() -> None:
    cause = ValueError("boom")
    exc = errors.PassError("gptq", cause, module="model.layers.3.q_proj", completed=["wanda", "rtn"])
    msg = str(exc)
    for part in ("'gptq'", "'model.layers.3.q_proj'", "'wanda', 'rtn'", "rolled back", "ValueError: boom"):
        assert part in msg
    assert exc.pass_name == "gptq" and exc.completed == ("wanda", "rtn") and exc.rolled_back
    assert "NOT rolled back" in str(errors.PassError("x", cause, rolled_back=False))


def test_ls_errors_is_the_module() -> None:
    assert ls.errors is errors


def test_pass_error_survives_pickling() -> None:
    import pickle

    exc = errors.PassError("gptq", ValueError("boom"), module="m", completed=["a"], rolled_back=False, phase="finalize")
    again = pickle.loads(pickle.dumps(exc))
    assert str(again) == str(exc) and again.completed == ("a",) and again.phase == "finalize"
