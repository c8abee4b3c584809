"""Export lanes: one AEP dataflow exports many datasets.

A lane is everything that makes two exports go the same way — org, sandbox, destination
identity, format, compression, path and schedule mode — but not the dataset: AEP writes each
dataset of a flow under `<path>/<datasetId>/exportTime=…/`, so datasets sharing a flow never
mix. A sandbox holds at most 100 destination dataflows (Adobe's guardrail), so one flow per
dataset cannot scale; one flow per lane can.

- **Finding**: a lane's flow is named after its fingerprint (a second shard, when a lane
  outgrows `max_datasets_per_flow`, adds `#2`…), so AEP says which lanes exist; a restarted
  or second daemon finds them by listing the flows with the lane prefix.
- **Membership**: a flow exports the datasets of its source connection, whose list cannot be
  changed. A dataset joins (or leaves) through a new source connection with the new set and a
  `replace /sourceConnectionIds` PATCH under `If-Match`; joins that arrive while a change is
  pending wait for the next one, so many datasets cost one change. A 412 re-reads and
  merges: a concurrent change by another daemon is never undone. Source connections are
  named after their dataset set, so a change cut short by a crash is found and finished;
  ones no flow uses are deleted.
- **Budget**: before a flow is made the sandbox's destination flows are counted; at
  `max_flows` the least recently used idle lane (no job here, a one-off schedule, and in AEP no
  run in progress and none for `lane_idle_s`) is retired — disabled, deleted with its source
  and target connections — or the job waits, bounded, and is then rejected naming the limit.
- **Lifecycle**: scheduled lanes carry an `endTime` that is moved forward well before it
  passes; one-off lanes keep their start parked far in the future, renewed the same way.
"""

from exporter.engine.lanes.identity import (
    LANE_PREFIX,
    Lane,
    LaneFlow,
    LaneKey,
    LaneView,
    desired_schedule,
    schedule_matches,
    set_digest,
)
from exporter.engine.lanes.manager import LaneManager

__all__ = [
    "LANE_PREFIX",
    "Lane",
    "LaneFlow",
    "LaneKey",
    "LaneManager",
    "LaneView",
    "desired_schedule",
    "schedule_matches",
    "set_digest",
]
