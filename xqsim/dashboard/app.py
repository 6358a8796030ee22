"""The dashboard's Streamlit script as the package ships it (`xqsim dashboard` runs this one; the checkout's
app.py, for `streamlit run app.py`, does the same)."""

from xqsim.dashboard.page import main

main()
