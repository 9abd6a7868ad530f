# redishilok 1.1.0 README, "Examples / Long-Running Operations with Refresh":
# unchanged but for the import, the Redis URL (HILOK_REDIS_URL) and the __main__ guard.
import asyncio
import os
from celery_hilok import RedisHiLok

REDIS_URL = os.environ.get("HILOK_REDIS_URL", "redis://127.0.0.1:6379/0")

async def main():
    hilok = RedisHiLok(REDIS_URL, ttl=2000, refresh_interval=1000)
    async with hilok.write('a/b'):
        print("Long operation starts")
        await asyncio.sleep(5)  # Lock is automatically refreshed

if __name__ == "__main__":
    asyncio.run(main())
