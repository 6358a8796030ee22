"""xqsim dashboard: `streamlit run app.py` (or `xqsim dashboard`). The page lives in xqsim/dashboard/."""

from xqsim.dashboard.page import main

main()
