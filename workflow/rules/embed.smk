# Frozen DINOv2 (or stand-in MobileNetV2) embeddings, the FAISS index of real neighbours, and the blend bank.


rule embed:
    input:
        prepared=f"{PREPARED}/slices.parquet",
        synthetic=f"{SYNTHETIC}/images.npy",
    output:
        real=f"{EMBED}/real.npy",
        real_table=f"{EMBED}/real.parquet",
        synthetic=f"{EMBED}/synthetic.npy",
        synthetic_table=f"{EMBED}/synthetic.parquet",
        encoder=f"{EMBED}/encoder.json",
    params:
        code=stage_code("sraseg.embed.run"),
        settings=gpu_settings("embed"),
        prepared=input_dir("prepared"),
        synthetic=input_dir("synthetic"),
        out_dir=output_dir("real"),
    log:
        f"{LOGS}/embed.log",
    benchmark:
        f"{LOGS}/benchmarks/embed.tsv"
    threads: CPU_THREADS
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m sraseg.device -- python -m sraseg embed --prepared-dir {params.prepared:q} --synthetic-dir {params.synthetic:q} --out-dir {params.out_dir:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule index:
    input:
        real=f"{EMBED}/real.npy",
        synthetic=f"{EMBED}/synthetic.npy",
        prepared=f"{PREPARED}/slices.parquet",
    output:
        index=f"{EMBED}/real.faiss",
        neighbours=f"{EMBED}/neighbours.parquet",
        fd=f"{EMBED}/fd_dinov2.json",
        projection=f"{EMBED}/projection.png",
        record=f"{EMBED}/index.json",
    params:
        code=stage_code("sraseg.embed.index"),
        settings=as_json(config["index"]),
        embed_dir=input_dir("real"),
        prepared=input_dir("prepared"),
        out_dir=output_dir("neighbours"),
    log:
        f"{LOGS}/index.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m sraseg index --embed-dir {params.embed_dir:q} --prepared-dir {params.prepared:q} --out-dir {params.out_dir:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


# train.unlabeled real: the same two stages on the real pool, into their own folder.
use rule embed as embed_real_pool with:
    input:
        prepared=f"{PREPARED}/slices.parquet",
        synthetic=f"{REAL_POOL}/images.npy",
    output:
        real=f"{EMBED_REAL}/real.npy",
        real_table=f"{EMBED_REAL}/real.parquet",
        synthetic=f"{EMBED_REAL}/synthetic.npy",
        synthetic_table=f"{EMBED_REAL}/synthetic.parquet",
        encoder=f"{EMBED_REAL}/encoder.json",
    log:
        f"{LOGS}/embed_real_pool.log",
    benchmark:
        f"{LOGS}/benchmarks/embed_real_pool.tsv"


use rule index as index_real_pool with:
    input:
        real=f"{EMBED_REAL}/real.npy",
        synthetic=f"{EMBED_REAL}/synthetic.npy",
        prepared=f"{PREPARED}/slices.parquet",
    output:
        index=f"{EMBED_REAL}/real.faiss",
        neighbours=f"{EMBED_REAL}/neighbours.parquet",
        fd=f"{EMBED_REAL}/fd_dinov2.json",
        projection=f"{EMBED_REAL}/projection.png",
        record=f"{EMBED_REAL}/index.json",
    log:
        f"{LOGS}/index_real_pool.log",


# maps bank: the fixed maps (maps.npy); maps fresh (rule blend_fresh below): one row per self-training draw
# (draws.parquet), the maps rendered in training. Each experiment's folder is written by one of the two.
rule blend:
    input:
        unpack(blend_inputs),
    output:
        maps=f"{RESULTS}/blend/{{exp}}/maps.npy",
        pairs=f"{RESULTS}/blend/{{exp}}/pairs.parquet",
        preview=f"{RESULTS}/blend/{{exp}}/preview.png",
        info=f"{RESULTS}/blend/{{exp}}/blend.json",
    wildcard_constraints:
        exp=blend_experiments("bank"),
    params:
        code=stage_code("sraseg.blend.run"),
        settings=blend_settings,
        draws=blend_draws,
        synthetic=input_dir("synthetic"),
        prepared=input_dir("prepared"),
        embed_dir=input_dir("real_embeddings"),
        out_dir=output_dir("pairs"),
    log:
        f"{LOGS}/blend_{{exp}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m sraseg blend --synthetic-dir {params.synthetic:q} --prepared-dir {params.prepared:q}"
        " --neighbours {input.neighbours:q} --embed-dir {params.embed_dir:q} --out-dir {params.out_dir:q} {params.draws:q}"
        " --settings {params.settings:q}"
        " > {log:q} 2>&1"


use rule blend as blend_fresh with:
    output:
        draws=f"{RESULTS}/blend/{{exp}}/draws.parquet",
        pairs=f"{RESULTS}/blend/{{exp}}/pairs.parquet",
        preview=f"{RESULTS}/blend/{{exp}}/preview.png",
        info=f"{RESULTS}/blend/{{exp}}/blend.json",
    wildcard_constraints:
        exp=blend_experiments("fresh"),
