# The report: one table over experiments and seeds, and figures, also for `snakemake --report`.


# One rule for every dataset: sraseg.report.run with the dataset's module (--dataset), which says what a
# summary.json holds and how its tables look; report_outputs() lists what the dataset's report writes.
rule report:
    input:
        summaries=get_final_output(),
        train_logs=expand(f"{RESULTS}/{{exp}}/seed{{seed}}/train_log.csv", exp=list(EXPERIMENTS), seed=SEEDS),
        optional=report_optional_inputs(),
    output:
        **report_outputs(),
    params:
        code=stage_code("sraseg.report.run", DATASET_MODULE),
        dataset=DATASET,
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
        "python -m sraseg report --dataset {params.dataset:q} --results-dir {params.results_dir:q}"
        " --out-dir {params.out_dir:q} --settings {params.settings:q} > {log:q} 2>&1"
