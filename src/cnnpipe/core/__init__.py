"""The library the stages and the server share: params, data, models, files, errors."""
