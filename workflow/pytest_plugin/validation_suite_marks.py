"""pytest plugin of the validation workflow: each test's marker names go into its junit entry.

``run_suites.py`` runs several marker suites of one commit as one pytest process (``-m "(a) or (b)"``:
one interpreter start and one collection instead of one per suite) and splits the junit file by
these names afterwards. It lives in a directory of its own so that putting it on ``PYTHONPATH``
cannot shadow a module of the commit under test. Standard pytest hooks only.
"""

PROPERTY = "validation-markers"


def pytest_collection_finish(session):
    # After every pytest_collection_modifyitems hook: a conftest may add markers there, and pytest's
    # -m selects by the markers as they are then. user_properties go into each report and from there
    # into junit's <properties> of the testcase (the record_property fixture would warn under
    # junit_family=xunit2; the junit writer does not).
    for item in session.items:
        item.user_properties.append((PROPERTY, " ".join(sorted({m.name for m in item.iter_markers()}))))
