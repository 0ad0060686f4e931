"""ImageFolder beyond local folders: how URL keys are placed under ``root`` and in classes.

Each test is a bug found by review (helper-74), since fixed: a root written with the
scheme's default port was another origin, and an encoded slash (%2F) split a class
folder. (The S3 folder under on_error="skip", spawned DataLoader workers, the default
decoder's modes and truncated files were checked and behave as documented.) Both tests
build the dataset only: no request is made.
"""

from __future__ import annotations

import pytest

from asyncload.folders import ImageFolder
from asyncload.sources import HTTPSource

pytest.importorskip("PIL")


def test_http_root_with_default_port_is_the_same_origin() -> None:
    """``https://host:443/`` and ``https://host/`` are one origin (HTTPSource's own origin
    check says so, asyncload/sources/http.py _origin): a key on the one is under a root
    on the other, not refused as "not under root"."""
    keys = ["https://host/data/cat/1.png", "https://host/data/dog/2.png"]
    ds = ImageFolder.from_source(HTTPSource(keys), root="https://host:443/data")
    assert ds.classes == ["cat", "dog"]
    ds = ImageFolder.from_source(
        HTTPSource(["http://host:80/data/cat/1.png"]), root="http://host/data"
    )
    assert ds.classes == ["cat"]


def test_http_percent_encoded_slash_does_not_split_a_class_folder() -> None:
    """``x%2Fy`` is one path segment (a folder named "x/y" on the server), not two: the
    two folders ``x%2Fy`` and ``x%2Fz`` below root are two classes, not merged into "x"."""
    keys = ["http://h/data/x%2Fy/1.png", "http://h/data/x%2Fz/2.png"]
    ds = ImageFolder.from_source(HTTPSource(keys), root="http://h/data")
    assert len(ds.classes) == 2, ds.classes
    assert ds.targets == [0, 1]
    # Without root, the class is the parent folder: a%2Fy and b%2Fy are different folders.
    keys = ["http://h/a%2Fy/1.png", "http://h/b%2Fy/2.png"]
    ds = ImageFolder.from_source(HTTPSource(keys))
    assert len(ds.classes) == 2, ds.classes
