"""Create the automations that notify a webhook of the champion gate's decisions (flows/run/gate_automations.py).

python scripts/gate_automations.py --webhook https://hooks.example.com/gptflow
"""

from ops.environment import apply_defaults

apply_defaults()  # before Prefect is imported: it reads its settings (the server to use) at import

from flows.run.gate_automations import main  # noqa: E402

main()
