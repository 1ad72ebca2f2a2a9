"""Stand-ins shared by the tests."""

from flwr.app import MetricRecord, RecordDict


class Reply:
    """A client reply as the server sees it (Flower's Message needs a live run to build).

    Give the whole ``content``, or just ``metrics`` for a reply that carries only those.
    """

    def __init__(self, node: int = 0, content: RecordDict | None = None,
                 metrics: dict | None = None):
        self.content = content if content is not None else RecordDict(
            {"metrics": MetricRecord(metrics or {})})
        self.metadata = type("Meta", (), {"src_node_id": node})()

    def has_error(self) -> bool:
        return False
