# redishilok 1.1.0 README, "Examples / Custom Separator":
# unchanged but for the import, the Redis URL (HILOK_REDIS_URL) and the __main__ guard.
import asyncio
import os
from celery_hilok import RedisHiLok

REDIS_URL = os.environ.get("HILOK_REDIS_URL", "redis://127.0.0.1:6379/0")

async def main():
    hilok = RedisHiLok(REDIS_URL, separator=':')
    async with hilok.write('a:b:c'):
        print("Write lock acquired on 'a:b:c'")

if __name__ == "__main__":
    asyncio.run(main())
