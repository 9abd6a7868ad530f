# redishilok 1.1.0 README, "Examples / Basic Hierarchical Locking":
# unchanged but for the import, the Redis URL (HILOK_REDIS_URL) and the __main__ guard.
import asyncio
import os
from celery_hilok import RedisHiLok

REDIS_URL = os.environ.get("HILOK_REDIS_URL", "redis://127.0.0.1:6379/0")

async def main():
    hilok = RedisHiLok(REDIS_URL)

    # Concurrent readers
    async with hilok.read('a'):
        async with hilok.read('a/b/c'):
            print("Both read locks succeed")

    # Write lock blocks descendants
    async with hilok.write('a'):
        try:
            async with hilok.read('a/b/c', timeout=0.1):
                pass
        except RuntimeError:
            print("Failed to acquire read lock on 'a/b/c' due to write lock on 'a'")

if __name__ == "__main__":
    asyncio.run(main())
