import os

from llmslim.testing import register_profiles

register_profiles(load=os.environ.get("HYPOTHESIS_PROFILE", "ci"))
