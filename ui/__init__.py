"""A small web page to try the caption service (``streamlit run ui/app.py``).

``ui.client`` holds the HTTP logic (request building, response and error interpretation) and
has no Streamlit dependency; ``ui/app.py`` is the page.
"""
