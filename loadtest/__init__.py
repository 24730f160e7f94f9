"""Locust load tests for the classification service.

``python -m loadtest run`` runs ``loadtest/locustfile.py`` headless against a
running service, writes Locust's CSV and HTML reports and prints a summary.
The locustfile also works with Locust's own command line and web UI
(``locust -f loadtest/locustfile.py``). Neither needs torch or the service's
packages.
"""
