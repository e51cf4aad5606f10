"""Turn the guest's console output into lab/results/latest.json and a table."""

import json
import re
from pathlib import Path

RESULT_LINE = re.compile(r"^LAB-RESULT (\{.*\})\s*$")
KERNEL_LINE = re.compile(r"^LAB: userspace up at .*kernel (\S+)")
VERSIONS_LINE = re.compile(r"^LAB-VERSIONS (\{.*\})\s*$")


def collect(console: Path, expected: list, distro: str) -> tuple:
    """(kernel, versions, results) of one boot: the guest's LAB-RESULT lines in order, each marked
    with the distribution, plus a failed entry for every expected scenario that printed none (the
    VM crashed or timed out before reaching it)."""
    kernel, versions, results = None, {}, []
    for line in console.read_text(errors="replace").splitlines():
        line = line.rstrip("\r")
        if m := KERNEL_LINE.match(line):
            kernel = m.group(1)
        elif m := VERSIONS_LINE.match(line):
            try:
                versions = json.loads(m.group(1))
            except ValueError:
                pass
        elif m := RESULT_LINE.match(line):
            try:
                results.append(json.loads(m.group(1)))
            except ValueError:
                pass
    seen = {r.get("name") for r in results}
    for sc in expected:
        if sc["name"] not in seen:
            results.append({
                "name": sc["name"], "tunnel": sc["tunnel"], "auth": sc["auth"], "backend": sc["backend"],
                "control": sc["control"], "ping_ok": False, "esp_packets": None, "plaintext_packets": None, "status_ok": False,
                "pass": False, "error": "no result from the VM (see console.log)"})
    return kernel, versions, [{"distro": distro, **r} for r in results]


def write(path: Path, results: list, runs: dict) -> None:
    """latest.json: every scenario of every distribution (each with its `distro`), and per
    distribution the boot's facts (kernel, component versions, build and VM seconds, exits)."""
    totals = {"build_seconds": round(sum(r["build_seconds"] for r in runs.values()), 1),
              "vm_seconds": round(sum(r["vm_seconds"] for r in runs.values()), 1)}
    path.write_text(json.dumps({"distros": runs, "scenarios": results, **totals}, indent=2) + "\n")


def table(results: list) -> str:
    cols = [("distro", "distro"), ("scenario", "name"), ("tunnel", "tunnel"), ("auth", "auth"), ("backend", "backend"),
            ("control", "control"), ("ping", "ping_ok"), ("esp", "esp_packets"), ("plain", "plaintext_packets"),
            ("status", "status_ok"), ("secs", "seconds"), ("result", "pass")]

    def cell(res, key):
        v = res.get(key)
        if key == "pass":
            return "PASS" if v else "FAIL"
        if isinstance(v, bool):
            return "ok" if v else "NO"
        return "-" if v is None else str(v)

    rows = [[h for h, _ in cols]] + [[cell(r, k) for _, k in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for r in results:
        if r.get("error"):
            lines.append(f"{r.get('distro', '')} {r['name']}: {r['error']}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """latest.json as the README's lab table: one row per distribution and scenario."""
    def count(value):
        return "–" if value is None else str(value)

    lines = ["| distribution | scenario | IKE daemon | ping | ESP | plaintext | s | result |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in report["scenarios"]:
        versions = report.get("distros", {}).get(r.get("distro"), {}).get("versions", {})
        daemon = versions.get("libreswan") if r["backend"] == "libreswan" else \
            f"strongSwan {(versions.get('strongswan') or '?').split('-')[0]}"
        ping = f"{r.get('ping_received', '–')}/{r.get('ping_sent', '–')}"
        lines.append(f"| {r.get('distro', '?')} | {r['name']} | {daemon} | {ping} | {count(r['esp_packets'])} "
                     f"| {count(r['plaintext_packets'])} | {r.get('seconds', '–')} | {'pass' if r['pass'] else 'FAIL'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # python3 -m labhost.report lab/results/latest.json (from lab/): the README's table
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
