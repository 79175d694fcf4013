"""The served page's sampling controls are made from the registered kinds' Settings: one control per setting the
API's generate body takes, typed, bounded and described as the Settings declare, marked with the kinds that read it
and whether /v1/edit takes it. (tests/test_registry.py shows a third kind's own setting on the page; the page's
behaviour in a browser is tests/test_serve_browser.py's.)"""

from __future__ import annotations

import dataclasses
import re
from html import unescape

import pytest

from binlat import registry, sampling
from binlat.processes.common import MAX_STEPS
from binlat.serve.page import page_html
from binlat.serve.schemas import request_bodies


@pytest.fixture(scope="module")
def html() -> str:
    return page_html(request_bodies())


def controls(html: str) -> dict[str, dict[str, str]]:
    """Each sampling control's attributes, by its setting's name."""
    found = {}
    for tag in re.findall(r"<(?:input|select) [^>]*data-setting=[^>]*>", html):
        attributes = {name: unescape(value) for name, value in re.findall(r'([\w-]+)="([^"]*)"', tag)}
        attributes["tag"] = tag.split()[0][1:]
        found[attributes["data-setting"]] = attributes
    return found


def options(html: str, ident: str) -> list[str]:
    menu = re.search(rf'<select id="{ident}"[^>]*>(.*?)</select>', html).group(1)
    return re.findall(r'<option value="([^"]*)">', menu)


def test_the_page_has_a_control_for_every_setting_with_its_type_and_bounds(html) -> None:
    shown = controls(html)
    assert list(shown) == list(sampling.settings())  # every registered setting, in the registry's order
    steps = shown["num_steps"]
    assert (steps["id"], steps["type"], steps["step"], steps["min"], steps["max"]) == (
        "steps",
        "number",
        "1",
        "1",
        str(MAX_STEPS),
    )
    assert (steps["data-kinds"], steps["data-params"], steps["title"]) == (
        "diffusion",
        "num_steps steps",
        "sampling steps",
    )
    guidance = shown["guidance_scale"]
    assert (guidance["data-type"], guidance["step"], float(guidance["min"]), "max" in guidance) == (
        "float",
        "any",
        0,
        False,
    )
    assert (guidance["data-kinds"], guidance["data-params"]) == ("diffusion ar", "guidance_scale cfg")
    assert "min" not in shown["rho"]  # rho > 0 declares no inclusive bound
    assert shown["protocol"]["tag"] == "select" and options(html, "protocol") == ["", "1", "2"]  # blank: the model's
    assert {name for name, c in shown.items() if c["data-edit"] == "1"} == set(
        request_bodies().edit.model_fields
    ) & set(shown)
    assert options(html, "generator") == list(registry.generator_kinds())
    # a label per control, saying which kinds read it where not all do
    assert (
        '<label for="steps">Steps (diffusion)</label>' in html
        and '<label for="temperature">Temperature</label>' in html
    )
    ids = re.findall(r' id="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # no control takes an id the page already has


def test_declared_bounds_and_choices_are_what_the_settings_allow() -> None:
    """A Settings field's `minimum`, `maximum` and `choices` (what the page offers) agree with the Settings' own
    check: each bound and choice is allowed, a value past a bound or outside the choices is refused."""
    declared = 0
    for kind in registry.generator_kinds():
        cls = registry.generator(kind).settings
        for f in dataclasses.fields(cls):
            low, high, choices = (f.metadata.get(key) for key in ("minimum", "maximum", "choices"))
            step = 1 if isinstance(f.default, int) else 1e-6
            for allowed, refused in (
                (low, None if low is None else low - step),
                (high, None if high is None else high + step),
            ):
                if allowed is not None:
                    declared += 1
                    cls(**{f.name: allowed})
                    with pytest.raises(ValueError):
                        cls(**{f.name: refused})
            for choice in choices or ():
                declared += 1
                cls(**{f.name: choice})
            if choices:
                with pytest.raises(ValueError):
                    cls(**{f.name: max(choices) + 1})
    assert declared >= 5  # steps 1 and MAX_STEPS, guidance and temperature 0, protocol 1 and 2 (diffusion, AR)
