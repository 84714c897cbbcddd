"""Job names and run tags, in one place: the jobs set them, the sensors, the launcher and the alerts read them.

Plain strings (no Dagster import), so any layer can name a job without importing the definitions.
"""

ROLE_TAG = "indexer/role"
CHAIN_TAG = "indexer/chain"
SINGLETON_TAG = "indexer/singleton"  # dagster.yaml limits each value to one run at a time
REORG_ID_TAG = "indexer/reorg_id"
LIVE_ROLE = "live"
REORG_ROLE = "reorg"
DEX_ROLE = "dex"


def historical_job_name(chain: str) -> str:
    return f"{chain}_historical_sync"


def live_job_name(chain: str) -> str:
    return f"{chain}_live_sync"


def reorg_job_name(chain: str) -> str:
    return f"{chain}_reorg"


def dex_job_name(chain: str) -> str:
    return f"{chain}_dex"


def dex_follow_job_name(chain: str) -> str:
    return f"{chain}_dex_follow"
