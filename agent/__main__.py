from agent.interrupts import ctrl_c_held, interrupted  # small, and first: the import needs it

try:
    with ctrl_c_held():  # yaml's and the standard library's native modules
        from agent.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing has started yet
    raise SystemExit(interrupted()) from None

raise SystemExit(main())
