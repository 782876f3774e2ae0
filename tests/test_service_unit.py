"""Units of the operations layer that need no daemon."""

import copy

import jsonpatch
import pytest
from modelutil import load

from peerdaemon.operations.environments import patch_along

OPS = [
    [{"op": "replace", "path": "/routes/0/responses/0/label", "value": "x"}],
    [{"op": "add", "path": "/routes/0/responses/0/headers/-", "value": {"key": "k", "value": "v"}}],
    [{"op": "remove", "path": "/routes/1/responses/0/headers/0"}],
    [{"op": "move", "from": "/routes/0", "path": "/routes/2"}],
    [{"op": "copy", "from": "/routes/0/responses/0", "path": "/routes/1/responses/-"}],
    [{"op": "replace", "path": "/name", "value": "n"}, {"op": "remove", "path": "/routes/3"}],
    [{"op": "add", "path": "/routes/0/documentation~1x", "value": 1}],
    # indexes shift under later ops, and under the `add` half of a `move`
    [
        {"op": "remove", "path": "/routes/0"},
        {"op": "replace", "path": "/routes/0/uuid", "value": 1},
    ],
    [{"op": "add", "path": "/routes/0", "value": {}}, {"op": "remove", "path": "/routes/1/method"}],
    [{"op": "move", "from": "/routes/0", "path": "/routes/1/responses/0"}],
    [{"op": "move", "from": "/routes/1/responses/0", "path": "/routes/0/responses/0/label"}],
    [
        {"op": "move", "from": "/routes/0", "path": ""},
        {"op": "replace", "path": "/method", "value": 1},
    ],
    [
        {"op": "copy", "from": "/routes/2", "path": ""},
        {"op": "remove", "path": "/responses/0/body"},
    ],
    [{"op": "move", "from": "/routes/0", "path": "/x"}, {"op": "add", "path": "/x/y", "value": 1}],
]


@pytest.mark.parametrize("ops", OPS)
def test_patching_the_copy_leaves_the_cached_export_untouched(ops):
    env = load("test-env.json")
    pristine = copy.deepcopy(env)
    expected = jsonpatch.apply_patch(copy.deepcopy(env), ops)
    patched = patch_along(env, ops)
    assert patched == expected
    assert env == pristine


def test_bad_paths_are_left_to_the_patch_library():
    env = load("test-env.json")
    pristine = copy.deepcopy(env)
    ops = [{"op": "replace", "path": "/routes/99/x", "value": 1}]
    with pytest.raises((jsonpatch.JsonPatchException, jsonpatch.JsonPointerException)):
        patch_along(env, ops)
    assert env == pristine
