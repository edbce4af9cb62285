fn main() {
    print!("{}", pacer_operator::crd::crd_yaml());
}
