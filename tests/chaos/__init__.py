"""The chaos harness (``harness``) and its CI test (``test_chaos``)."""
