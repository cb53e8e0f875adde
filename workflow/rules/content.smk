# What the synthetic images contain: the labeled-only model segments them and as many held-out real
# slices. A rule of its own, not part of the index stage's index.json: there it would make the index,
# the blend bank and every SRA-Seg training wait for, and rerun with, the labeled-only training.
# It exists only when the config has a labeled_only experiment and some experiment uses synthetic data.

if content_enabled():

    rule content:
        input:
            model=content_model()["model"],
            meta=content_model()["meta"],
            synthetic=f"{SYNTHETIC}/images.npy",
            prepared=f"{PREPARED}/slices.parquet",
        output:
            summary=f"{CONTENT}/content.json",
            table=f"{CONTENT}/content.parquet",
            figure=f"{CONTENT}/content.png",
        params:
            code=stage_code("sraseg.evaluate.content"),
            settings=gpu_settings("content"),
            synthetic=input_dir("synthetic"),
            prepared=input_dir("prepared"),
            out_dir=output_dir("summary"),
        log:
            f"{LOGS}/content.log",
        threads: CPU_THREADS
        resources:
            gpu=1,
            mem_mb=8000,
            runtime=60,
        conda:
            "../../envs/gpu.yaml"
        shell:
            "python -m sraseg.device -- python -m sraseg content --model {input.model:q} --synthetic-dir {params.synthetic:q}"
            " --prepared-dir {params.prepared:q} --out-dir {params.out_dir:q} --settings {params.settings:q} > {log:q} 2>&1"
