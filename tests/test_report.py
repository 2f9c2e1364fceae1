"""bench.report: the README's generated tables, from the committed bench/results JSON."""
import json
import os

from bench import report


def test_report_renders_the_committed_results():
    text = report.report()
    assert "Performance targets (issue 19)" in text and "Performance targets (issue 7)" in text
    world = report.world_report()
    gates = json.load(open(os.path.join(report.RESULTS, "world_h200.json")))["gates"]
    assert f"of {len(gates)} gates hold" in world and all(f"| {name} |" in world for name in gates)
    assert "The claim over all pairs" in world


def test_readme_tables_are_the_generated_ones():
    readme = open(os.path.join(report.ROOT, "README.md")).read()
    for begin, end, body in ((report.BEGIN, report.END, report.report()),
                             (report.WORLD_BEGIN, report.WORLD_END, report.world_report())):
        assert readme.split(begin, 1)[1].split(end, 1)[0].strip() == body.strip()
