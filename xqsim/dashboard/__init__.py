"""The Streamlit dashboard: data.py builds each view's tables from the library (no Streamlit), charts.py turns
them into Altair charts, controls.py holds the sidebar and the URL state, views.py and page.py draw the page.
`streamlit run app.py` or `xqsim dashboard` opens it."""
