# The report: one table over experiments and seeds, and figures, also for `snakemake --report`.


# FIVES: the image and stacked modes' tables and the training curves (sraseg.report.fives); a rule of
# its own, so the ACDC report rule (after `else:`) keeps its command and code hash exactly.
if FIVES:

    rule report_fives:
        input:
            summaries=get_final_output(),
            train_logs=expand(f"{RESULTS}/{{exp}}/seed{{seed}}/train_log.csv", exp=list(EXPERIMENTS), seed=SEEDS),
        output:
            table=f"{RESULTS}/report/results.csv",
            markdown=f"{RESULTS}/report/results.md",
            curves=f"{RESULTS}/report/figures/training_curves.png",
        params:
            code=stage_code("sraseg.report.fives"),
            settings=as_json({"experiments": EXPERIMENTS, "seeds": SEEDS}),
            results_dir=lambda wildcards, output: os.path.dirname(os.path.dirname(output.table)),
            out_dir=output_dir("table"),
        log:
            f"{LOGS}/report.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../envs/cpu.yaml"
        shell:
            "python -m sraseg report --dataset fives --results-dir {params.results_dir:q} --out-dir {params.out_dir:q}"
            " --settings {params.settings:q} > {log:q} 2>&1"

else:

    rule report:
        input:
            summaries=get_final_output(),
            train_logs=expand(f"{RESULTS}/{{exp}}/seed{{seed}}/train_log.csv", exp=list(EXPERIMENTS), seed=SEEDS),
            optional=report_optional_inputs(),
        output:
            **report_outputs(),
        params:
            code=stage_code("sraseg.report.run"),
            settings=as_json({"experiments": EXPERIMENTS, "seeds": SEEDS}),
            results_dir=lambda wildcards, output: os.path.dirname(os.path.dirname(output.table)),
            out_dir=output_dir("table"),
        log:
            f"{LOGS}/report.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../envs/cpu.yaml"
        shell:
            "python -m sraseg report --results-dir {params.results_dir:q} --out-dir {params.out_dir:q}"
            " --settings {params.settings:q} > {log:q} 2>&1"
