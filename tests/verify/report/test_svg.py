"""The SVG plots on their own: edge cases a report can hit, and escaping."""

from __future__ import annotations

from xml.etree import ElementTree

from corolla.verify.report.svg import Bar, Mark, Series, line_chart, stacked_bars


def _parse(svg: str) -> ElementTree.Element:
    return ElementTree.fromstring(svg)


def test_line_chart_edge_cases_are_well_formed() -> None:
    for series in (
        [],
        [Series(label="one point", points=[(100.0, 0.5)])],
        [Series(label="same time", points=[(100.0, 0.5), (100.0, 0.7)])],
        [Series(label="empty", points=[])],
    ):
        _parse(line_chart(series, title="t"))


def test_line_chart_scales_into_its_box_and_zooms_on_the_scores() -> None:
    svg = line_chart(
        [Series(label="a", points=[(0.0, 0.62), (50.0, 0.9), (100.0, 0.95)]), Series(label="b", points=[(0.0, 0.99)])],
        title="t",
        marks=[Mark(at=60.0, label="quarantine of a", kind="quarantine")],
        width=500,
        height=200,
    )
    root = _parse(svg)
    ns = "{http://www.w3.org/2000/svg}"
    (line,) = root.iter(f"{ns}polyline")
    xs, ys = zip(*(map(float, p.split(",")) for p in line.get("points", "").split()), strict=True)
    assert min(xs) >= 0 and max(xs) <= 500 and min(ys) >= 0 and max(ys) <= 200
    assert ys[0] > ys[1] > ys[2]  # a higher score is drawn higher
    labels = [t.text for t in root.iter(f"{ns}text")]
    assert "0.60" in labels and "1.00" in labels  # the axis starts at the lowest score's tenth
    assert any(t.text == "quarantine of a" for t in root.iter(f"{ns}title"))


def test_labels_are_escaped() -> None:
    evil = '<script>alert("x")</script>&'
    for svg in (
        line_chart([Series(label=evil, points=[(0.0, 0.5), (1.0, 0.6)], alert=True)], title=evil),
        stacked_bars([Bar(label=evil, passed=3, failed=1, inconclusive=0, alert=True)], title=evil),
    ):
        assert "<script" not in svg and "&lt;script&gt;" in svg
        root = _parse(svg)
        assert not [e for e in root.iter() if e.tag.endswith("script")]


def test_stacked_bars_are_proportional() -> None:
    svg = stacked_bars(
        [Bar(label="a", passed=6, failed=2, inconclusive=2), Bar(label="b", passed=0, failed=0, inconclusive=0)],
        title="t",
        width=530,
    )
    root = _parse(svg)
    widths = {
        r.findtext("{http://www.w3.org/2000/svg}title"): float(r.get("width", "0"))
        for r in root.iter("{http://www.w3.org/2000/svg}rect")
        if r.findtext("{http://www.w3.org/2000/svg}title")
    }
    assert widths == {"a: 6 passed": 144.0, "a: 2 failed": 48.0, "a: 2 inconclusive": 48.0}
