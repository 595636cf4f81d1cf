"""estgw's test suite (run with trial; see README).

Property tests (hypothesis) run with no deadline: the suite shares a
loaded machine, and a slow example is not a failing one.  Set
``HYPOTHESIS_PROFILE=ci`` for a derandomized run that keeps no example
database, so a run depends on the code alone.
"""

import os

from hypothesis import settings

settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
