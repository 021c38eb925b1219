"""Gateway commands.

python -m app serve                 # the gateway alone (settings from DREAMOMNI2_*)
python -m app hash-key NAME         # a new API key and the DREAMOMNI2_API_KEYS entry for it
"""

from __future__ import annotations

import argparse
import sys

from app.auth import hash_key, new_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="DreamOmni2 Serve gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway (uvicorn)")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    key = commands.add_parser("hash-key", help="make an API key and its configuration entry")
    key.add_argument("name", help="who the key is for; jobs are owned by this name")
    args = parser.parse_args(argv)

    if args.command == "hash-key":
        if ":" in args.name or "," in args.name:
            parser.error("the name may not contain ':' or ','")
        secret = new_key()
        print(f"key (give this to the caller, it is not stored): {secret}")
        print(f"DREAMOMNI2_API_KEYS entry: {args.name}:{hash_key(secret)}")
        return 0

    import uvicorn

    from app.settings import GatewaySettings
    from workers.logs import configure_logging

    settings = GatewaySettings()
    # Our format from the first line on, uvicorn's included: uvicorn leaves logging alone (no
    # `log_config`), and each of its worker processes sets it up again in `create_app`.
    configure_logging(settings.log_format)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_config=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
