# redishilok 1.1.0 README, "Examples / Manually-managed Operations with Handles":
# unchanged but for the import, the Redis URL (HILOK_REDIS_URL) and the __main__ guard.
import asyncio
import os
from celery_hilok import RedisHiLok

REDIS_URL = os.environ.get("HILOK_REDIS_URL", "redis://127.0.0.1:6379/0")

async def main():
    hilok = RedisHiLok(REDIS_URL)
    uuid = await hilok.acquire_write('a/b')
    await asyncio.sleep(1)  # Lock is not automatically refreshed, caller must "restore" the lock

    # refresh by uuid, manually
    manual = RedisHiLok(REDIS_URL)
    await manual.acquire_write("a/b", uuid=uuid)

    # refresh automatically
    other = RedisHiLok(REDIS_URL, refresh_interval=1000)
    async with other.write('a/b', uuid=uuid):
        # lock is auto-refreshing in the background
        pass

    # free resources
    await hilok.close()
    await manual.close()
    await other.close()

if __name__ == "__main__":
    asyncio.run(main())
