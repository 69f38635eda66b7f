"""The HTML reports in a real browser: headless Chromium renders ``report.html`` (analyze) and
``<name>.report.html`` (convert); the tables and the SVG drawings are in the rendered DOM, sorting
works, and nothing is written to the console (no script error, no bad SVG attribute).

Needs Debian's ``chromium`` (``make browser`` installs it where apt-get can); skipped with that
message where it cannot be installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mha2sha import zoo
from mha2sha.cli import main

CHROMIUM = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium, or `make browser`): "
    "the HTML report is not checked in a browser here",
)

# Appended after the report's own script: sorts every sortable table by each column, both ways,
# and records in the DOM whether the rows came out in order (the report's sort, not this one).
_CHECK = """<script>
(function () {
  function key(cell) {
    var t = cell.textContent.trim(); var n = parseFloat(t.replace(/,/g, ''));
    return isNaN(n) ? t.toLowerCase() : n;
  }
  var bad = [];
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    for (var col = 0; col < heads.length; col++) {
      for (var pass = 0; pass < 2; pass++) {
        heads[col].click();
        var keys = Array.prototype.map.call(table.tBodies[0].rows, function (r) { return key(r.cells[col]); });
        var asc = heads[col].getAttribute('aria-sort') === 'ascending';
        for (var i = 1; i < keys.length; i++) {
          var a = keys[i - 1], b = keys[i];
          if (typeof a !== typeof b) { a = String(a); b = String(b); }
          if (asc ? a > b : a < b) { bad.push(table.id + ':' + col); break; }
        }
      }
    }
  });
  document.body.setAttribute('data-sort-check', bad.length ? 'failed ' + bad.join(',') : 'ok');
})();
</script>"""


def _render(report: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after the scripts ran, and every console message Chromium logged."""
    page = tmp_path / "page.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def _check_page(dom: str, console: list[str], tables: list[str]) -> None:
    assert console == [], console
    assert 'data-ready="true"' in dom  # the report's own script ran
    assert 'data-sort-check="ok"' in dom, re.findall(r'data-sort-check="[^"]*"', dom)
    for table in tables:
        assert f'id="{table}"' in dom, table
    drawings = re.findall(r'<svg[^>]*class="sketch"', dom)
    assert len(drawings) >= 2  # one block as the graph has it, one head after the split
    assert dom.count('class="node role-proj"') >= 2 and 'class="node role-join"' in dom
    assert "http://" not in dom.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_analyze_report_renders(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["analyze", str(zoo.build("prepared_llama_gqa_step")), "-o", str(out)]) == 0
    dom, console = _render(out / "report.html", tmp_path)
    _check_page(dom, console, ["attention-table", "ops-table", "inputs-table", "timing-table"])
    assert "role-rope" in dom and "role-kv" in dom and "role-mask" in dom


def test_convert_report_renders(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert main(["convert", str(zoo.build("llama_gqa_step")), "-o", str(out)]) == 0
    dom, console = _render(out / "model.report.html", tmp_path)
    _check_page(dom, console, ["verification-table", "attention-table", "ops-table", "timing-table"])
    assert "PASS" in dom
