"""The baseline of the one-shot workload: a bare redis-py script doing what one ``streambus
signal`` or ``streambus wait`` (with the signal already there) does, in as many round trips.

    python benchmarks/bare_oneshot.py signal URL STREAM PAYLOAD
    python benchmarks/bare_oneshot.py wait URL STREAM GROUP

``signal``: one ``XADD``. ``wait``: ``XGROUP CREATE ... 0 MKSTREAM`` (an existing group is
fine), ``XREADGROUP ... COUNT 1`` from the group's start, ``XACK``. Run as a plain script (not
``-m``), so that it imports nothing but redis-py, as a bare script would.
"""

import json
import sys
from typing import Any

import redis


def main(argv: list[str]) -> int:
    command, url, stream = argv[:3]
    client: Any = redis.Redis.from_url(url)  # its reply types are unions; bytes here
    if command == "signal":
        entry_id = client.xadd(stream, {"e": argv[3]})
        print(json.dumps({"stream_id": entry_id.decode()}))
        return 0
    group = argv[3]
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    [[_, [(entry_id, fields)]]] = client.xreadgroup(group, group, {stream: ">"}, count=1)
    client.xack(stream, group, entry_id)
    print(json.dumps({"stream_id": entry_id.decode(), "payload": fields[b"e"].decode()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
