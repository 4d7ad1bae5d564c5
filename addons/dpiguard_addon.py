"""dpiguard as a mitmproxy script, for teams that already run mitmproxy.

    mitmdump --mode reverse:https://dpi.example.org@0.0.0.0:8443 \
        -s addons/dpiguard_addon.py --set dpiguard_config=/etc/dpiguard/dpiguard.yaml

Prefer `dpiguard run --config FILE`, which also sets the mitmproxy options dpiguard needs
(lazy upstream connection, verified upstream TLS, the hospital's certificate).
"""

from dpiguard.services import mitmproxy_addon

addons = [mitmproxy_addon()]
