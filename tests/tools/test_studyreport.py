from dpseg.tools.studyreport import privacy_audit_table


def _row(variant: str, broken: bool, bound: float, claim: float = 8.0, **more) -> dict:
    return {"variant": variant, "broken": broken, "epsilon_lower_bound": bound, "epsilon_lower_bound_gdp": bound + 1,
            "caught": bound + 1 > claim, "runs": 2, "canaries": 800, **more}


def test_the_empirical_epsilon_table_shows_the_one_run_columns_where_the_audit_ran_them():
    one_run = {"epsilon_lower_bound_one_run": 2.9, "epsilon_estimate": 7.1, "estimate_above_claim": False}
    audits = [{"claimed_epsilon": 8.0, "results": [_row("shipped", False, 3.1, **one_run),
                                                   _row("noise off", True, 6.0, epsilon_lower_bound_one_run=4.6,
                                                        epsilon_estimate=129.0, estimate_above_claim=True)]},
              {"claimed_epsilon": 3.0, "results": [_row("shipped", False, 1.2, 3.0), _row("noise off", True, 7.2, 3.0)]}]
    text = "\n".join(privacy_audit_table({"privacy_audits": audits}))
    assert "| shipped | no | 3.10 / 4.10; one run: 2.90 / 7.10 | 1.20 / 2.20 | no, no |" in text
    # at claimed 8 the broken variant's bounds stay under the claim: its estimate catches it
    assert "| noise off | yes | 6.00 / 7.00; one run: 4.60 / 129.00 | 7.20 / 8.20 | yes, yes |" in text
    assert privacy_audit_table({}) == []
