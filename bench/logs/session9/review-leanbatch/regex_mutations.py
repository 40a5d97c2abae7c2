"""Which changes to PG_BATCH the derivation of PG_BATCH_UNLOCATED refuses (its own
check, and the other import-time check on the same text, _lean_statements).
Usage: PYTHONPATH=/work/main python regex_mutations.py"""
from app.db import writers
from app.db.writers import PG_BATCH, _lean_statements, _unlocated_batch_statement

P = PG_BATCH
MUT = {
 "places also for denied/failed logins (placed WHERE)":
    P.replace("WHERE n.outcome = 'allowed' AND v.place IS NOT NULL",
              "WHERE n.outcome <> 'nope' AND v.place IS NOT NULL"),
 "a third place kind from remote_ip (places for unlocated logins)":
    P.replace("(VALUES ('country', n.country), ('asn', n.asn::text))",
              "(VALUES ('country', n.country), ('asn', n.asn::text), ('net', host(n.remote_ip)))"),
 "a new CTE after placed":
    P.replace(" ) SELECT (SELECT count(*) FROM new)",
              " ), audited AS ( INSERT INTO login_audit SELECT event_id FROM new RETURNING 1 ) "
              "SELECT (SELECT count(*) FROM new)"),
 "reply gains (SELECT count(*) FROM placed)":
    P.replace("FROM new WHERE new_location)", "FROM new WHERE new_location), (SELECT count(*) FROM placed)"),
}
for k, m in MUT.items():
    assert m != P, k
    res = []
    for fn in (_unlocated_batch_statement, _lean_statements):
        try:
            out = fn(m)
            res.append("accepted")
            if fn is _unlocated_batch_statement:
                lean = out
        except RuntimeError as e:
            res.append("REFUSED")
            lean = None
    extra = ""
    if lean is not None:
        extra = (" | lean keeps 'audited': %s, lean mentions placed: %s, 'net': %s" %
                 ("audited" in lean, "placed" in lean, "'net'" in lean))
    print(f"{k}: _unlocated_batch_statement {res[0]}, _lean_statements {res[1]}{extra}")
