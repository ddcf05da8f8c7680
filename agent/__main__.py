try:
    from agent.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing has started yet
    raise SystemExit(130) from None

raise SystemExit(main())
