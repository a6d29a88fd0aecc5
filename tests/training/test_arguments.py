import json

import pytest

from llava.training.parsing import check_model_paths, parse_args

PARTS = ["--vision_model_name_or_path", "V", "--language_model_name_or_path", "L"]
DATA = ["--data_path", "a.json,b.jsonl", "--output_dir", "out"]


def test_parts_and_stage_flags_parse():
    model_args, data_args, _, training_args = parse_args(
        PARTS + DATA + ["--freeze_vision_model", "True", "--freeze_language_model", "True", "--learning_rate", "1e-3"])
    assert model_args.assembles_new_model
    assert data_args.data_path == "a.json,b.jsonl"
    assert training_args.freeze_language_model and training_args.freeze_vision_model
    assert not training_args.freeze_projector
    assert training_args.learning_rate == 1e-3
    assert training_args.report_to == ["tensorboard"]


@pytest.mark.parametrize("argv, message", [
    (["--model_name_or_path", "M"] + PARTS + DATA, "not both"),
    (["--vision_model_name_or_path", "V"] + DATA, "No model given"),
    (DATA, "No model given"),
    (PARTS + ["--output_dir", "out"], "--data_path is required"),
    (PARTS + DATA + ["--freeze_vision_model", "True", "--freeze_projector", "True", "--freeze_language_model", "True"],
     "Every component is frozen"),
    (PARTS + DATA + ["--eval_strategy", "steps"], "trains without an evaluation set.*llava.evaluate"),
    (PARTS + DATA + ["--eval_strategy", "steps", "--save_strategy", "steps", "--load_best_model_at_end", "True"],
     "nothing to evaluate or pick a best checkpoint by"),
    (PARTS + DATA + ["--vision_tune_last_n_layers", "2"],
     "--vision_tune_last_n_layers 2 trains .* --freeze_vision_model True .* Pass --freeze_vision_model False"),
    (PARTS + DATA + ["--freeze_vision_model", "False", "--vision_tune_last_n_layers", "0"], "must be at least 1"),
    (PARTS + DATA + ["--freeze_vision_model", "False", "--vision_tune_last_n_layers", "1", "--lora_enable", "True",
                     "--lora_target_modules", "all-linear,vision_tower.q_proj"],
     "also puts adapters on it .*vision_tower.q_proj.* Pick one"),
])
def test_conflicting_flags_fail_with_the_fix(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


@pytest.mark.parametrize("flag", ["--vision_model_name_or_path", "--language_model_name_or_path"])
@pytest.mark.parametrize("missing", ["/no/such/tower", "./gone", "out/demo/never_trained"])
def test_a_missing_model_folder_is_refused_before_loading(tmp_path, flag, missing):
    parts = dict(zip(PARTS[::2], PARTS[1::2]), **{flag: missing})
    with pytest.raises(ValueError, match=f"--{flag[2:]} {missing}: no such folder"):
        check_model_paths(parse_args([text for pair in parts.items() for text in pair] + DATA).model)
    parts[flag] = str(tmp_path)  # an existing folder, and hub ids ("V", "org/name"), pass
    check_model_paths(parse_args([text for pair in parts.items() for text in pair] + DATA).model)
    check_model_paths(parse_args(PARTS[:1] + ["openai/clip-vit-large-patch14-336"] + PARTS[2:] + DATA).model)


def test_unknown_choice_is_refused():
    with pytest.raises(SystemExit):
        parse_args(PARTS + DATA + ["--vision_feature_select_strategy", "cls"])


def test_single_config_file(tmp_path):
    config = {"model_name_or_path": "M", "data_path": "d.json", "output_dir": "o", "freeze_language_model": True}
    json_path = tmp_path / "stage.json"
    json_path.write_text(json.dumps(config))
    yaml_path = tmp_path / "stage.yaml"
    yaml_path.write_text("\n".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in config.items()))
    for path in (json_path, yaml_path):
        model_args, data_args, _, training_args = parse_args([str(path)])
        assert model_args.model_name_or_path == "M" and training_args.freeze_language_model


@pytest.mark.parametrize("flags, find_unused", [
    ([], False),  # every trainable weight is used at every step
    (["--freeze_vision_model", "False"], True),  # the tower's layers after --vision_feature_layer are not
    (["--freeze_vision_model", "False", "--vision_tune_last_n_layers", "1"], True),  # N may cover every layer
    (["--ddp_find_unused_parameters", "True"], True),
])
def test_ddp_searches_unused_parameters_only_when_the_tower_trains(flags, find_unused):
    assert parse_args(PARTS + DATA + flags).training.ddp_find_unused_parameters is find_unused


def test_fsdp_on_cpu_warns_that_it_runs_ddp(caplog):
    parse_args(PARTS + DATA + ["--use_cpu", "True", "--fsdp", "full_shard auto_wrap"])
    assert "FSDP is ignored on CPU" in caplog.text
