"""`dconnx view`: serve a converted model and open its explanation page in the browser."""
from __future__ import annotations

import threading
import time

from ..errors import OptionError


def view(model, host: str, port: int, config, open_browser: bool = True) -> None:
    """Serve `model` and open the page in the browser once the server answers."""
    import socket
    import webbrowser

    from .app import make_server
    with socket.socket() as s:      # a port in use is refused here, before the model is loaded
        try:
            s.bind((host, int(port)))
        except OSError as e:
            raise OptionError(f"cannot listen on {host}:{port}: {e.strerror or e} (--port 0 picks a free "
                              "port)") from None
        port = s.getsockname()[1]
    server = make_server(model, host, port, config)     # the server of `dconnx serve`, timeouts included
    url = f"http://{host}:{port}/"

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"dconnx view: the explanation page is at {url} (Ctrl+C to stop)", flush=True)
            if open_browser and not webbrowser.open(url):
                print("dconnx view: no browser found; open the URL above yourself", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
