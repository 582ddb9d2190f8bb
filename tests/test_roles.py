"""Token roles: text, LLaVA image spans with their grid, segments, flagged tokens, vision grids, errors."""

from __future__ import annotations

import pytest

import headlab as hl
from headlab.probe.roles import grid_roles, text_roles


def test_text_roles_with_an_image_span_and_segments():
    ids = [1, 5, 9, 9, 9, 9, 6, 7, 8]  # 4 image tokens (a 2x2 grid) after two text tokens
    roles = text_roles(ids, image_token_id=9, segments=[(6, 8)], flagged=[7])
    assert roles.positions("bos") == [0]
    assert roles.positions("image") == [2, 3, 4, 5]
    assert roles.grid == (2, 2) and roles.grid_start == 2
    assert roles.positions("segment_0") == [6, 7] and roles.positions("text") == [1, 8]
    assert roles.flagged == (7,)
    assert roles.extended(2).positions("answer") == [9, 10]


def test_flagging_and_errors():
    roles = text_roles([1, 2, 3])
    assert roles.with_flagged([2]).flagged == (2,)
    with pytest.raises(hl.InputError, match="outside"):
        roles.with_flagged([3])
    with pytest.raises(hl.InputError, match="'image' is absent"):
        roles.positions("image")
    with pytest.raises(hl.InputError, match="does not fit"):
        text_roles([1, 2, 3], segments=[(2, 5)])
    with pytest.raises(hl.InputError, match="no tokens"):
        text_roles([])


def test_vision_grid_roles():
    roles = grid_roles(2, (3, 3))
    assert roles.positions("cls") == [0, 1] and len(roles.positions("patch")) == 9 and roles.grid_start == 2
    assert grid_roles(1, (4, 4), n_tokens=26).grid == (
        5,
        5,
    )  # another image size: the grid follows the tokens
    odd = grid_roles(1, (4, 4), n_tokens=20)  # no square grid fits: patches without a grid
    assert odd.grid is None and len(odd.positions("patch")) == 19 and odd.positions("cls") == [0]
    assert grid_roles(0, None, n_tokens=12).present() == ("patch",)  # a tower without a nominal grid


def test_vision_grid_roles_with_registers_and_without_cls():
    roles = grid_roles(5, (2, 2), registers=4)  # DINOv2 with registers: CLS, 4 registers, the grid
    assert roles.names == ("cls", "patch", "register") and roles.positions("cls") == [0]
    assert roles.positions("register") == [1, 2, 3, 4] and roles.positions("patch") == [5, 6, 7, 8]
    assert grid_roles(5, (2, 2), n_tokens=21, registers=4).grid == (4, 4)
    assert grid_roles(0, (2, 2)).present() == ("patch",)  # SigLIP: no CLS token
    with pytest.raises(hl.InputError, match="register tokens do not fit"):
        grid_roles(0, (2, 2), registers=1)
    with pytest.raises(hl.InputError, match="do not fit 5 prefix tokens"):
        grid_roles(5, (2, 2), n_tokens=3)
