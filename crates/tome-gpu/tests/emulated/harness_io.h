// What every harness does with its files: read arrays from the input, write floats out.
#pragma once

#include <stdio.h>
#include <stdlib.h>

#include <vector>

// `n` values of T from `f`; exits with 2 on a short input.
template <class T>
static std::vector<T> read_vec(FILE* f, size_t n) {
    std::vector<T> v(n);
    if (n && fread(v.data(), sizeof(T), n, f) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return v;
}

// Writes `parts` one after another to `path`; false if it cannot.
static bool write_floats(const char* path, std::initializer_list<const std::vector<float>*> parts) {
    FILE* o = fopen(path, "wb");
    if (!o) return false;
    for (const auto* p : parts) fwrite(p->data(), sizeof(float), p->size(), o);
    fclose(o);
    return true;
}
