"""The HTML flame graph in a real browser, headless Chromium driven by Selenium: the page
loads offline without errors, and its table, search, zoom, hover, orientation and the
differential colours show what the profile holds. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import colorsys
import re
import shutil
from pathlib import Path

import pytest

from bpfprof.collector.output.flamegraph import write_diff_flamegraph, write_flamegraph
from bpfprof.collector.profile import Labels, Profile, cpu_profile, wall_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from bpfprof.collector.output.units import format_value
from conftest import skip_or_fail

ARTIFACTS = Path(__file__).parent.parent / "artifacts"
MS = 1_000_000

APP = Module("/usr/bin/app")
LIB = Module("/usr/lib/libcompute.so")
KERNEL = Module("[kernel.kallsyms]")
MAIN = Frame(FrameKind.NATIVE, "main", APP, 0x1100, "app.c", 30, 28)
HANDLE = Frame(FrameKind.PYTHON, "handle", None, 0, "app.py", 12, 10)
WORK = Frame(FrameKind.PYTHON, "work", None, 0, "app.py", 22, 20)
COMPUTE = Frame(FrameKind.NATIVE, "compute", LIB, 0x2200)
READ = Frame(FrameKind.KERNEL, "ksys_read", KERNEL, 0xFFFFFFFF81000000)
LABELS = Labels(pid=10, tid=11, comm="app", thread="main")


def wall() -> Profile:
    """1 s of wall time. work runs under handle, and once handle under work, so a search for
    work must count that 100 ms once: 60% of all, not 70%."""
    profile = wall_profile(hz=100, start_ns=1_700_000_000_000_000_000)
    profile.duration_ns = 2_000_000_000
    for stack, ms in [((READ, WORK, HANDLE, MAIN), 300), ((WORK, HANDLE, MAIN), 200), ((COMPUTE, MAIN), 350),
                      ((WORK, HANDLE, WORK, MAIN), 100), ((MAIN,), 50)]:
        profile.add(stack, LABELS, [ms * MS])
    return profile


@pytest.fixture(scope="module")
def driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (scripts/setup --test installs it)")
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        skip_or_fail("no chromedriver (scripts/setup --test installs chromium and its driver)")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A driver path of our own: Selenium then never looks for (or downloads) one.
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield browser
    browser.quit()


def open_page(driver, path: Path):
    driver.get_log("browser")  # what an earlier page logged is not this page's
    driver.get(path.as_uri())
    assert driver.execute_script("return window.flamegraphFirstPaintMs") > 0
    return driver


@pytest.fixture
def page(driver, tmp_path):
    path = tmp_path / "wall.html"
    write_flamegraph(wall(), str(path))
    return open_page(driver, path)


@pytest.fixture
def diff_page(driver, tmp_path):
    old = Frame(FrameKind.NATIVE, "old_path", APP, 0x1300, "app.c", 50, 48)
    added = Frame(FrameKind.NATIVE, "new_path", APP, 0x1400, "app.c", 60, 58)
    base, new = cpu_profile(hz=100, start_ns=0), cpu_profile(hz=100, start_ns=0)
    for profile, counts in ((base, {WORK: 40, COMPUTE: 40, old: 20}), (new, {WORK: 120, COMPUTE: 60, added: 20})):
        for frame, count in counts.items():
            profile.add((frame, MAIN), LABELS, [count, count * 10 * MS])
    path = tmp_path / "diff.html"
    write_diff_flamegraph(base, new, str(path))
    return open_page(driver, path)


def assert_no_errors(driver) -> None:
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def frames(driver, name=None):
    drawn = driver.execute_script("return window.flamegraph.frames()")
    return [f for f in drawn if name is None or f["name"] == name]


def frame(driver, name):
    """The widest drawn frame of this function."""
    found = frames(driver, name)
    assert found, f"no frame {name} drawn"
    return max(found, key=lambda f: f["width"])


def canvas(driver):
    return driver.find_element("id", "canvas")


def point_at(driver, target):
    """The mouse over the middle of a drawn frame (Selenium's offsets are from the canvas's
    centre)."""
    from selenium.webdriver import ActionChains

    element = canvas(driver)
    dx = target["x"] + target["width"] / 2 - element.size["width"] / 2
    dy = target["y"] + target["height"] / 2 - element.size["height"] / 2
    return ActionChains(driver).move_to_element_with_offset(element, int(dx), int(dy))


def pixel(driver, target):
    """The colour drawn just inside a frame's top left corner, clear of its text."""
    return tuple(driver.execute_script(
        "const r = window.devicePixelRatio || 1;"
        "return Array.from(arguments[0].getContext('2d').getImageData("
        "(arguments[1] + 1) * r, (arguments[2] + 1) * r, 1, 1).data.slice(0, 3));",
        canvas(driver), target["x"], target["y"]))


def table(driver):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#functions tbody tr'),"
        " row => Array.from(row.cells, cell => cell.textContent));")


def header(driver, label):
    return driver.find_element("xpath", f"//table[@id='functions']//th[text()='{label}']")


def crumbs(driver):
    return [c.text for c in driver.find_elements("css selector", "#breadcrumb .crumb")]


def matched_text(driver):
    return driver.find_element("id", "matched").text


def test_loads_offline_without_errors(page):
    title = page.find_element("id", "title").text
    assert title == "wall: 1.00 s, 5 stacks, over 2.00 s"
    assert page.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert page.execute_script("return document.querySelectorAll('script[src], link[rel=stylesheet]').length") == 0
    assert {f["name"] for f in frames(page)} == {"all", "main", "handle", "work", "compute", "ksys_read"}
    screenshot(page, "flamegraph.png")
    assert_no_errors(page)


def test_values_read_as_units_py_formats_them(page):
    cases = [(v, unit) for unit in ("nanoseconds", "microseconds", "seconds", "bytes", "count")
             for v in (0, 7, 1234, 5_678_901, 2_500_000_000, 12.345, -3_000_000)]
    shown = page.execute_script(
        "return arguments[0].map(([v, unit]) => window.flamegraph.formatValue(v, unit));", cases)
    assert shown == [format_value(v, unit) for v, unit in cases]


def test_table_has_every_function_and_sorts_by_self_or_total(page):
    rows = table(page)
    assert [r[4] for r in rows] == ["compute", "work", "ksys_read", "main", "handle"]  # most self first
    assert rows[3] == ["5.00%", "50.00 ms", "100.00%", "1.00 s", "main", "app.c:28"]
    assert rows[0][5] == "libcompute.so" and rows[1][5] == "app.py:20"

    header(page, "Total").click()
    assert [r[4] for r in table(page)] == ["main", "work", "handle", "compute", "ksys_read"]
    assert header(page, "Total").get_attribute("aria-sort") == "descending"
    header(page, "Self %").click()
    assert [r[4] for r in table(page)] == ["compute", "work", "ksys_read", "main", "handle"]
    header(page, "Self %").click()
    assert [r[4] for r in table(page)] == ["handle", "main", "work", "ksys_read", "compute"]
    assert header(page, "Total").get_attribute("aria-sort") is None
    assert_no_errors(page)


def test_table_shows_the_first_rows_and_more_on_request(driver, tmp_path):
    profile = wall_profile(hz=100, start_ns=0)
    for i in range(250):
        profile.add((Frame(FrameKind.NATIVE, f"f{i}", APP, 0x2000 + i), MAIN), LABELS, [(i + 1) * MS])
    write_flamegraph(profile, str(tmp_path / "many.html"))
    page = open_page(driver, tmp_path / "many.html")
    assert len(table(page)) == 200
    more = page.find_element("id", "more")
    assert more.text == "show 51 more (200 of 251 functions shown)"
    more.click()
    assert len(table(page)) == 251 and not more.is_displayed()
    header(page, "Total").click()  # sorting keeps every row shown
    assert [r[4] for r in table(page)][:3] == ["main", "f249", "f248"] and len(table(page)) == 251
    assert_no_errors(page)


def test_clicking_a_row_highlights_its_function_in_the_graph(page):
    row = page.find_element("xpath", "//table[@id='functions']//tr[td[text()='work']]")
    row.click()
    assert page.execute_script("return window.flamegraph.highlighted()") == ["work"] * 3
    assert "selected" in row.get_attribute("class")
    work, compute = frames(page, "work")[0], frame(page, "compute")
    r, g, b = pixel(page, compute)
    assert r == g == b > 220  # other functions dimmed
    assert pixel(page, work) != pixel(page, compute)
    screenshot(page, "flamegraph_selected.png")
    row.click()
    assert page.execute_script("return window.flamegraph.highlighted()") == []
    assert_no_errors(page)


def test_search_shows_the_share_of_matching_stacks_once(page):
    from selenium.webdriver.common.keys import Keys

    box = page.find_element("id", "search")

    def search(text):
        box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        if text:
            box.send_keys(text)
        return matched_text(page)

    assert search("WOR") == "matched: 60.00% of all (600.00 ms)"  # substring, any case
    assert {f["name"] for f in frames(page) if f["matched"]} == {"work"}
    assert len([f for f in frames(page) if f["matched"]]) == 3
    screenshot(page, "flamegraph_search.png")
    page.find_element("id", "regex").click()
    assert search("handle|work") == "matched: 60.00% of all (600.00 ms)"
    assert search("^k") == "matched: 30.00% of all (300.00 ms)"
    assert search("(") == "not a regular expression"
    assert not any(f["matched"] for f in frames(page))
    assert search("") == ""
    assert_no_errors(page)


def test_clicking_a_frame_zooms_in_and_the_breadcrumb_zooms_out(page):
    width = canvas(page).size["width"]
    assert crumbs(page) == ["all"]
    point_at(page, frame(page, "compute")).click().perform()
    assert crumbs(page) == ["all", "main", "compute"]
    assert frame(page, "compute")["width"] == width
    assert frames(page, "work") == []
    page.find_element("xpath", "//nav[@id='breadcrumb']/button[text()='all']").click()
    assert crumbs(page) == ["all"]
    assert frame(page, "compute")["width"] == pytest.approx(0.35 * width)
    assert_no_errors(page)


def test_hover_shows_name_where_total_and_self(page):
    point_at(page, frame(page, "handle")).perform()
    tooltip = page.find_element("id", "tooltip")
    assert tooltip.is_displayed()
    assert tooltip.text.splitlines() == [
        "handle", "app.py:10 (Python)",
        f"total {format_value(500 * MS, 'nanoseconds')} (50.00%)",
        f"self {format_value(0, 'nanoseconds')} (0.00%)",
    ]


def test_flame_puts_the_root_at_the_bottom_icicle_at_the_top(page):
    root = frame(page, "all")
    assert root["y"] == max(f["y"] for f in frames(page))
    page.find_element("css selector", "input[value=icicle]").click()
    assert frame(page, "all")["y"] == 0
    assert frame(page, "ksys_read")["y"] == max(f["y"] for f in frames(page))
    screenshot(page, "flamegraph_icicle.png")
    page.find_element("css selector", "input[value=flame]").click()
    assert frame(page, "all")["y"] == root["y"]


def hue(rgb) -> float:
    return colorsys.rgb_to_hls(*(c / 255 for c in rgb))[0] * 360


def test_kernel_native_and_python_frames_have_the_colours_of_their_legend(page):
    legend = dict(page.execute_script(
        "return Array.from(document.querySelectorAll('#legend > span'),"
        " item => [item.textContent, getComputedStyle(item.firstChild).backgroundColor]);"))
    families = {name: hue(tuple(int(c) for c in re.findall(r"\d+", colour)))
                for name, colour in legend.items()}
    for name, label in (("ksys_read", "kernel"), ("compute", "native (C, C++, Rust, ...)"),
                        ("main", "native (C, C++, Rust, ...)"), ("handle", "Python")):
        distance = abs(hue(pixel(page, frame(page, name))) - families[label])
        assert min(distance, 360 - distance) < 25, (name, label)


def test_diff_colours_growth_red_and_shrinkage_blue(diff_page):
    page = diff_page
    work, compute, main = frame(page, "work"), frame(page, "compute"), frame(page, "main")
    assert work["change"] == pytest.approx(0.2) and compute["change"] == pytest.approx(-0.1)
    assert main["change"] == pytest.approx(0)
    r, g, b = pixel(page, work)
    assert r > 200 and g < 60 and b < 60  # the largest change: full red
    r, g, b = pixel(page, compute)
    assert b > r + 80 and b > g
    r, g, b = pixel(page, main)
    assert r == g == b
    assert frames(page, "old_path") == []  # only in base: in the table, not the graph

    rows = {r[6]: r[:6] for r in table(page)}
    assert rows["old_path"] == ["20.00%", "0.00%", "-20.00 pts", "20.00%", "0.00%", "-20.00 pts"]
    assert rows["work"] == ["40.00%", "60.00%", "+20.00 pts", "40.00%", "60.00%", "+20.00 pts"]
    header(page, "Self change").click()
    assert table(page)[0][6] == "work"
    header(page, "Self change").click()
    assert table(page)[0][6] == "old_path"

    point_at(page, work).perform()
    assert "share of all: base 40.00%, new 60.00% (+20.00 pts)" in page.find_element("id", "tooltip").text
    screenshot(page, "flamegraph_diff.png")
    assert_no_errors(page)
