# redishilok 1.1.0 README, "Usage":
# unchanged but for the import, the Redis URL (HILOK_REDIS_URL) and the __main__ guard.
import asyncio
import os
from celery_hilok import RedisHiLok

REDIS_URL = os.environ.get("HILOK_REDIS_URL", "redis://127.0.0.1:6379/0")

async def main():
    hilok = RedisHiLok(REDIS_URL)

    # Acquire a read lock
    async with hilok.read('a/b'):
        print("Read lock acquired on 'a/b'")

        # Acquire a write lock with non-blocking mode
        try:
            async with hilok.write('a', block=False):
                print("Write lock acquired on 'a'")
            print("Never gets here")
        except RuntimeError:
            print("Failed to acquire write lock on 'a'")

if __name__ == "__main__":
    asyncio.run(main())
