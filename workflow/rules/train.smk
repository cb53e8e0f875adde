# Segmentation training, one job per experiment and seed.


rule train:
    input:
        unpack(train_inputs),
    output:
        model=f"{RESULTS}/{{exp}}/seed{{seed}}/model.safetensors",
        meta=f"{RESULTS}/{{exp}}/seed{{seed}}/model.json",
        log_table=f"{RESULTS}/{{exp}}/seed{{seed}}/train_log.csv",
    params:
        code=stage_code("sraseg.train.loop"),
        settings=train_settings,
        prepared=input_dir("prepared"),
        out_dir=output_dir("model"),
        synthetic=optional_dir("--synthetic-dir", "synthetic"),
        embed=optional_dir("--embed-dir", "neighbours"),
        blend=optional_dir("--blend-dir", "blend"),
    log:
        f"{LOGS}/train_{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train_{{exp}}_seed{{seed}}.tsv"
    threads: CPU_THREADS
    resources:
        gpu=1,
        mem_mb=16000,
        # 60k iterations at the paper's settings take several hours on one GPU; last.ckpt resumes.
        runtime=720,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m sraseg.device -- python -m sraseg train --prepared-dir {params.prepared:q} --out-dir {params.out_dir:q} --seed {wildcards.seed:q}"
        " {params.synthetic:q} {params.embed:q} {params.blend:q} --settings {params.settings:q} > {log:q} 2>&1"
